// Package e2e holds end-to-end tests and benchmarks that run the worker
// binary as a child process against an embedded JetStream server and the
// DLF emulator: what only a real process shows (resident memory, SIGKILL,
// exit statuses) is measured here.
package e2e
