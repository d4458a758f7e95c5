package consumer

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test's workers, servers and emulators are gone when the package's
// tests end: a goroutine left behind by a shutdown path fails the run.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
