package emulator

// TB is the part of testing.TB that StartForTest uses; *testing.T and
// *testing.B satisfy it. Taking this instead of testing.TB keeps the
// testing package out of binaries (worker dev) that link the emulator.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
}

// StartForTest creates an emulator with opts, starts it on a free loopback
// port and registers its Close with t.Cleanup. It returns the emulator and
// its base URL, and fails the test if it cannot start.
func StartForTest(t TB, opts ...Option) (*Emulator, string) {
	t.Helper()
	e := New(opts...)
	url, err := e.Start()
	if err != nil {
		t.Fatalf("start DLF emulator: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("close DLF emulator: %v", err)
		}
	})
	return e, url
}
