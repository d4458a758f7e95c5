// Package config holds the worker's configuration: one Config struct for
// every environment variable of section 7 of the contract, plus the subject,
// stream, consumer and bucket names of section 2.
//
// # Loading
//
// FromEnv starts from Default, overlays the environment and validates the
// result. Load does the first two steps only, for commands that need a part
// of the configuration (the `worker stop` command needs NATS and Subjects,
// not DLF): they call Load and then the Validate method of the parts they
// use.
//
// Rules shared by every variable:
//
//   - A variable that is unset, empty or only whitespace takes its default.
//     Leading and trailing whitespace is trimmed from every value, secrets
//     included, so a trailing newline from `echo secret | kubectl create
//     secret ...` does no harm.
//   - Durations use time.ParseDuration syntax ("500ms", "10m", "24h") and must
//     be positive.
//   - Every problem is reported, not only the first (errors.Join), each as
//     "VARIABLE: what is wrong". A secret's value (SK, security token, auth
//     token, NATS password or token) never appears in an error, and
//     Redacted, the String methods and the JSON encodings of NATS and DLF
//     show a set secret as "[redacted]".
//   - Validate reads the file system: every path variable (NATS_CREDS,
//     NATS_NKEY, NATS_CA, NATS_CERT, NATS_KEY and the *_FILE variables) must
//     name a readable, non-empty regular file when the worker starts. It only
//     opens the files; their contents are read by the packages that use them.
//
// # DLF endpoint
//
// DLF_ENDPOINT wins over DLF_REGION; with only DLF_REGION set the endpoint is
// https://dayu-dlf.<region>.myhuaweicloud.com. Neither set is an error. The
// endpoint must be an absolute http or https URL without credentials, query
// or fragment; plain http is accepted only for loopback hosts (127.0.0.0/8,
// ::1, localhost). A trailing slash is removed.
//
// # DLF credentials
//
// Exactly one of these, or none:
//
//   - AK/SK: HUAWEICLOUD_SDK_AK (or HUAWEICLOUD_SDK_AK_FILE) together with
//     HUAWEICLOUD_SDK_SK (or HUAWEICLOUD_SDK_SK_FILE), optionally with
//     HUAWEICLOUD_SDK_SECURITY_TOKEN for temporary credentials.
//   - An IAM token: DLF_AUTH_TOKEN or DLF_AUTH_TOKEN_FILE.
//
// A value and its *_FILE variant set together is an error, as is AK without
// SK (or SK without AK), AK/SK together with a token, and a security token
// without AK/SK.
//
// No credentials at all is accepted: the worker then sends unsigned requests,
// which is what the local DLF emulator (`worker dev`) expects. Real DLF
// answers those with 401, which the worker retries as a credentials problem,
// so a missing secret shows up as retries and, eventually,
// retries_exhausted outcomes rather than as a start-up failure.
// DLF.Unauthenticated reports this case so the caller can log it at start.
//
// # NATS credentials
//
// At most one method: NATS_USER with NATS_PASSWORD (or NATS_PASSWORD_FILE),
// NATS_TOKEN, NATS_CREDS, or NATS_NKEY. NATS_USER without a password, a
// password without NATS_USER, and NATS_CERT without NATS_KEY (or the reverse)
// are errors. NATS_URL is a comma separated list of nats://, tls://, ws:// or
// wss:// URLs (a URL without a scheme means nats://); credentials inside a URL
// are passed on to NATS as they are and are redacted wherever the URL is
// shown (RedactURL). A '/', '?', '#', '@' or ',' in a user name or password
// must be percent-encoded: unencoded, it ends the user information early, so
// the URL is invalid (the error says so) or names another host ("u:12/34@h"
// is host u, port 12). Since no parser can tell where such a password
// ends, RedactURL hides everything up to the last '@' of each URL of the
// list, so a host, port or path before that '@' is hidden too; and a
// password that looks like the start of another URL ("u:p,ws://x@h") is
// hidden in both pieces, unless its first piece reads as a host, port or
// path.
//
// # Rate limit
//
// DLF_RATE_LIMIT 0 turns rate limiting off. When it is set and DLF_RATE_BURST
// is not, Load sets the burst to 1.
package config
