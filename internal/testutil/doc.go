// Package testutil holds what the tests of several packages need alike:
// waiting for a condition with a deadline instead of sleeping, a buffer a
// child process may write while the test reads it, and an embedded
// JetStream server on a random port with its own store directory.
//
// It is imported by tests only.
package testutil
