// Package emulator is an in-process emulator of the DataArts Studio (DLF)
// script API over real HTTP, for integration tests, benchmarks and
// `worker dev`. It keeps script instances in memory, answers the execute,
// query and stop APIs, verifies AK/SK signatures or tokens as the API gateway
// would, records the stop requests it receives, and injects faults (latency,
// errors, throttling, hangs, lost answers, refused connections) that can be
// changed while it runs.
//
//	e, url := emulator.StartForTest(t, emulator.WithCredentials(ak, sk))
//	id := e.Execute("proj", "", "daily_report")
//	e.SetFaults(emulator.Faults{DropAfterStop: true})
//	// ... run the worker against url ...
//	if !e.Stopped("proj", "daily_report", id) { ... }
//
// # Routes
//
//	POST /v1/{project_id}/scripts/{script_name}/execute                     200 {"instanceId":"..."}
//	GET  /v1/{project_id}/scripts/{script_name}/instances/{instance_id}      200 {"status":"...","results":[]}
//	POST /v1/{project_id}/scripts/{script_name}/instances/{instance_id}/stop 204, no body
//
// Path parameters are percent-decoded segment by segment, so script names
// may hold any Unicode. The optional header "workspace" names the workspace;
// without it the default workspace ("") is meant. Every answer carries a
// unique X-Request-Id.
//
// # What comes from Huawei's documentation and what is assumed
//
// Page ids refer to Huawei Cloud's public API reference, as collected in
// the project's spec/dlf-api-facts.md.
//
//	behaviour                                                 source
//	--------------------------------------------------------  -----------------------------------------------
//	stop: path, POST, optional workspace header, 204 no body  documented: dataartsstudio_02_0059, dlf_02_0059
//	stop of a missing instance: 400 DLF.6205                  documented: dataartsstudio_02_0059 (example)
//	DLF.6205 text; every DLF.* code is HTTP 400               documented: dataartsstudio_02_0313, dlf_02_0044
//	error body {"error_code","error_msg"}                     documented: dataartsstudio_02_0313
//	execute: path, 200 {"instanceId"}                         documented: SDK model ExecuteScriptResponse
//	query: path, {"status","results"}, the 4 statuses         documented: dataartsstudio_02_0101
//	SDK-HMAC-SHA256, X-Sdk-Date signed, 15 min skew           documented: APIG AK/SK signing, SDK signer
//	401 APIG.0301 bad auth; 429 APIG.0308 throttled           documented: API gateway error codes
//	--------------------------------------------------------  -----------------------------------------------
//	a stopped instance reports FAILED (StatusStopped)         assumption: undocumented
//	stopping a LAUNCHING instance works like RUNNING          assumption
//	stopping a stopped/FINISHED/FAILED one: DLF.6205          assumption
//	DLF.6205 text from the error table, not from 0059         assumption: the two pages word it differently
//	workspace mismatch: DLF.6205 (query: same rule)           assumption
//	scripts not modelled: DLF.6201 never answered             assumption / simplification
//	X-Project-Id must be present on AK/SK requests            assumption: DLF docs are silent
//	  (not compared with the path project; else 401)          assumption
//	X-Security-Token checked for temporary creds only         assumption
//	AK/SK and token both configured: either passes            assumption
//	Retry-After (whole seconds) on 429                        assumption: APIG does not document it
//	unknown route or method: 404 APIG.0101                    assumption: code not in our facts
//	injected errors: {"error_code":"EMU.<status>"}            emulator-only, never sent by DLF
//	X-Request-Id: 32 hex digits, unique                       assumption about its shape
//	instance ids: random, UUID-shaped                         assumption about their shape
//	execute and query meet only AuthFail and Down             emulator design
//
// # Faults
//
// See Faults for the order in which they are met. Global faults are set with
// SetFaults; SetFaultsFor overrides them whole for one instance's stop
// requests (global Down still applies, as it closes the listener).
//
// # Cost
//
// Instances live in a sharded map (one mutex per shard), counters are
// atomic, the request log is a ring behind one short mutex, and requests are
// logged only at debug level, so the emulator serves thousands of requests a
// second on two cores.
package emulator
