//go:build unix

package config

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/testutil"
)

// A FIFO where a secret file belongs is refused at once: opened blindly,
// it would wait for a writer, and the worker would neither start nor exit.
func TestFromEnvRefusesAFIFO(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"NATS_PASSWORD_FILE", "HUAWEICLOUD_SDK_SK_FILE", "DLF_AUTH_TOKEN_FILE"} {
		fifo := testutil.FIFO(t, dir, name)
		m := env(name, fifo)
		if name == "NATS_PASSWORD_FILE" {
			m["NATS_USER"] = "worker"
		}
		if name == "HUAWEICLOUD_SDK_SK_FILE" {
			m["HUAWEICLOUD_SDK_AK"] = "AKFIFOTEST"
		}
		var err error
		testutil.Returns(t, 5*time.Second, "FromEnv with "+name+" a FIFO", func() { _, err = FromEnv(lookupMap(m)) })
		if want := fmt.Sprintf("%s: %q is not a regular file", name, fifo); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s a FIFO: err = %v, want %q", name, err, want)
		}
	}
}
