// Package deploy holds what it takes to run the dlf-stop worker: the
// container image (Dockerfile), Kubernetes manifests (kubernetes/), and the
// NATS server configuration and stream definitions (nats/).
//
// It has no Go code of its own. Its tests check the artifacts against the
// worker's contract and code: every environment variable a manifest sets is
// one the worker reads (config.EnvNames), the manifests load as a valid
// configuration, probes, shutdown timing and security settings are right,
// the stream and consumer definitions match what the worker expects, and the
// NATS permissions let each user do its job and nothing else, proven
// against an embedded server started from deploy/nats/nats-server.conf.
package deploy
