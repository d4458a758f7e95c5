// Package consumer is the processing loop of the dlf-stop worker.
//
// It binds a durable pull consumer on the stop-command stream, validates
// each command, calls the DLF stop API with exponential backoff, publishes
// exactly one outcome event per command, dead-letters every command that
// did not end in "stopped", and only then acknowledges the command.
//
// Two things shape the design:
//
//   - Nothing may be lost. A command is acked only after JetStream returned
//     a stored-ack for its outcome (and its dead letter, when it has one). A
//     failed publish naks the command with a delay; a panic is recovered and
//     naks it with a growing delay, and a command that still panics after
//     RETRY_MAX_ELAPSED is given up and dead-lettered; a shutdown naks everything not yet decided so another replica
//     takes it at once.
//   - A slow or failing command must not hold up healthy ones. A DLF call
//     holds one of WORKER_CONCURRENCY slots only while it is on the wire.
//     Short backoff waits happen in-process, with InProgress heartbeats
//     keeping JetStream from redelivering; long waits hand the message back
//     with NakWithDelay so it costs this worker nothing while it waits. The
//     give-up clock starts when JetStream stored the command, so it survives
//     redeliveries and restarts.
//
// Scaling out is more replicas on the same durable consumer: JetStream
// spreads messages across them; this package holds no cluster logic.
package consumer
