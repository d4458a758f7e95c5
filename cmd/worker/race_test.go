//go:build race

package main

// raceEnabled builds the child binary with the race detector when the tests
// themselves run with it, so a race in the real process fails them too.
const raceEnabled = true
