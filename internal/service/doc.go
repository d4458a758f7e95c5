// Package service wires the worker from its configuration: NATS, the
// JetStream streams and consumer, the DLF client with its credentials, the
// processing loop and the operations HTTP server. cmd/worker calls Run;
// worker dev calls it too, with an embedded NATS and emulator.
package service
