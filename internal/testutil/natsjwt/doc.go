// Package natsjwt builds operator-mode NATS security for tests: an
// operator, accounts known to the server through a memory resolver, and
// users' .creds files. Both the auth matrix (natsconn) and the failure
// tests (e2e, a worker holding a creds seed) use it.
package natsjwt
