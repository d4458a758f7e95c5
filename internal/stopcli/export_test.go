package stopcli

import "testing"

// SetPublishedHook makes Run call f once its command is stored, before
// the wait for the outcome, until the test ends: the moment a test cuts
// the link, interrupts or stores an outcome at.
func SetPublishedHook(t testing.TB, f func()) {
	t.Helper()
	testHookPublished = f
	t.Cleanup(func() { testHookPublished = nil })
}
