// Package dlf is the worker's only door to Huawei Cloud DataArts Studio
// (DataArts Factory, "DLF"): it stops one script instance per call and says
// what the result means.
//
// Why it exists rather than using the official SDK client: the worker makes
// thousands of calls per second through one tuned, reused HTTP client, must
// know whether a failed call had been fully sent (the stop may then have
// happened), must never follow a redirect, and must keep secrets out of every
// error. The official Go SDK stays the reference for signing: the tests in
// sign_sdk_test.go run its signer over the same requests and require
// byte-identical Authorization headers.
//
// The package has four parts, one file each:
//
//   - sign.go: APIG "SDK-HMAC-SHA256" request signing (SignRequest) and the
//     gateway-side check used by tests and the emulator (VerifyRequest).
//   - client.go: Client.Stop, the HTTP call and the decoding of its answer.
//   - errors.go: APIError (an answer that is not 2xx), its sentinels, and
//     TransportError (no answer).
//   - classify.go: Classify, the decision table of the contract, section 6.
//
// # From Huawei's public documentation
//
//   - The call: POST /v1/{project_id}/scripts/{script_name}/instances/{instance_id}/stop,
//     optional header "workspace", empty body, success 204 without body
//     (DataArts Studio API reference, dataartsstudio_02_0059).
//   - The error body {"error_code","error_msg"} and HTTP 400 for every DLF.*
//     code, e.g. DLF.6205, DLF.6201, DLF.6888 (dataartsstudio_02_0313).
//   - API gateway codes APIG.0301 (401, bad IAM authentication) and
//     APIG.0308 (429, throttling or an exhausted daily quota).
//   - Endpoints https://dayu-dlf.{region}.myhuaweicloud.com.
//   - SDK-HMAC-SHA256 signing as the official Go SDK (v0.1.207,
//     core/auth/signer) does it: X-Sdk-Date signed, 15 minutes of allowed
//     clock skew, X-Security-Token for temporary credentials, Content-Type
//     never signed; X-Project-Id sent as the SDK's credentials do.
//
// # Our assumptions (not documented by Huawei)
//
//   - The request id is read from the X-Request-Id response header only, as
//     the contract defines dlf_request_id; a "request_id" field of an error
//     body is not taken.
//   - APIG.* and APIGW.* name the same gateway errors (APIError.Is).
//   - Retry-After may come with 408, 429 or 5xx answers; it is honoured when
//     present (seconds or HTTP date, capped at 24h).
//   - 1xx and 3xx answers are permanent failures, and statuses outside
//     100-599 or errors Classify does not know are retried: losing a command
//     is worse than retrying it until RETRY_MAX_ELAPSED.
//   - User-Agent is not signed (the SDK signs its own). The gateway checks
//     the headers the Authorization header lists, so either is accepted, and
//     an unsigned User-Agent survives proxies that rewrite it.
//   - An error body is read up to 64 KiB; error_msg is kept to 1 KiB with
//     control characters replaced, so it fits logs and NATS headers.
package dlf
