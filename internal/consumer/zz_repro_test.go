package consumer

import (
	"fmt"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestReproShutdownNakRace(t *testing.T) {
	for _, noState := range []bool{true, false} {
		t.Run(fmt.Sprint(noState), func(t *testing.T) {
			e := newEnv(t, func(c *Config) {
				c.Concurrency = 2
				c.CallTimeout = 20 * time.Second
				c.ShutdownTimeout = 200 * time.Millisecond
				c.DisableState = noState
			})
			e.emu.SetFaults(emulator.Faults{Hang: true})
			e.publishMany(t, 8, "h")
			r := e.startWorker(nil)
			testutil.Eventually(t, 10*time.Second, func() error {
				if got := e.emu.StopCalls(); got < 2 {
					return fmt.Errorf("%d calls hanging", got)
				}
				return nil
			})
			r.stop(t)
			e.emu.SetFaults(emulator.Faults{})
			e.startWorker(nil)
			e.out.wait(t, 8, 5*time.Second)
		})
	}
}
