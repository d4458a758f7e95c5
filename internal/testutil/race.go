//go:build race

package testutil

// RaceEnabled says the race detector is on. Tests that run the worker
// binary as a child process build it with -race then, so that a race in
// the real process fails them too.
const RaceEnabled = true
