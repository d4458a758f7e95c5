//go:build unix

package secretfile

import (
	"errors"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/testutil"
)

// A FIFO put where a secret file belongs (a rotation gone wrong) is
// refused at once, not waited on: the watcher's re-read would hang.
func TestReadRefusesAFIFO(t *testing.T) {
	fifo := testutil.FIFO(t, t.TempDir(), "sk")
	var err error
	testutil.Returns(t, 5*time.Second, "reading a FIFO", func() { _, err = readSecret(fifo) })
	if !errors.Is(err, ErrNotRegular) {
		t.Fatalf("err = %v, want ErrNotRegular", err)
	}
}
