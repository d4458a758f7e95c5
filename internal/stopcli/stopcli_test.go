package stopcli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/service"
	"github.com/dlf-stop/worker/internal/stopcli"
	"github.com/dlf-stop/worker/internal/testutil"
	"github.com/dlf-stop/worker/internal/testutil/natsjwt"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// env is a lookup function over a fixed map, as stopcli.Run takes it.
func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

// runStop runs `worker stop args...` in-process and returns its exit
// status and what it wrote.
func runStop(t *testing.T, lookup map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = stopcli.Run(context.Background(), args, env(lookup), &out, &errOut)
	t.Logf("worker stop %s -> %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out.String(), errOut.String())
	return code, out.String(), errOut.String()
}

// --help prints the usage and succeeds; it is not bad usage.
func TestHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		code, _, stderr := runStop(t, map[string]string{"NATS_URL": "nats://127.0.0.1:1"}, arg)
		if code != 0 || !strings.Contains(stderr, "-script") {
			t.Errorf("%s: exit = %d, usage %q", arg, code, stderr)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	// No NATS runs here: every case must fail before connecting.
	lookup := map[string]string{"NATS_URL": "nats://127.0.0.1:1"}
	tests := []struct {
		name string
		args []string
	}{
		{"no arguments", nil},
		{"missing --instance", []string{"--script", "s"}},
		{"missing --script", []string{"--instance", "i-1"}},
		{"empty --script", []string{"--script", "", "--instance", "i-1"}},
		{"bad --id characters", []string{"--script", "s", "--instance", "i-1", "--id", "bad id!"}},
		{"--id too long", []string{"--script", "s", "--instance", "i-1", "--id", strings.Repeat("a", 129)}},
		{"extra argument", []string{"--script", "s", "--instance", "i-1", "extra"}},
		{"--wait 0", []string{"--script", "s", "--instance", "i-1", "--wait", "0"}},
		{"negative --wait", []string{"--script", "s", "--instance", "i-1", "--wait", "-1s"}},
		{"--wait not a duration", []string{"--script", "s", "--instance", "i-1", "--wait", "soon"}},
		{"unknown flag", []string{"--script", "s", "--instance", "i-1", "--bogus"}},
		// Values the worker would reject (found by review: published,
		// then rejected and dead-lettered).
		{"--script .", []string{"--script", ".", "--instance", "i-1"}},
		{"--script with a slash", []string{"--script", "a/b", "--instance", "i-1"}},
		{"--instance with a slash", []string{"--script", "s", "--instance", "a/b"}},
		{"--instance too long", []string{"--script", "s", "--instance", strings.Repeat("i", 129)}},
		{"bad --project", []string{"--script", "s", "--instance", "i-1", "--project", "p/q"}},
		{"bad --workspace", []string{"--script", "s", "--instance", "i-1", "--workspace", "w s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runStop(t, lookup, tt.args...)
			if code != stopcli.ExitUsage {
				t.Errorf("exit = %d, want %d", code, stopcli.ExitUsage)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if stderr == "" {
				t.Error("stderr is empty, want a reason")
			}
		})
	}
}

func TestBadNATSEnvironmentIsUsage(t *testing.T) {
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": "http://127.0.0.1:4222"},
		"--script", "s", "--instance", "i-1")
	if code != stopcli.ExitUsage {
		t.Errorf("exit = %d, want %d", code, stopcli.ExitUsage)
	}
	if stdout != "" || !strings.Contains(stderr, "NATS_URL") {
		t.Errorf("stdout = %q, stderr = %q; want nothing and a message naming NATS_URL", stdout, stderr)
	}
}

// A creds file that can never work (its JWT expired) is bad configuration,
// not a missed outcome: running the line again cannot help (found by
// review: exit 2).
func TestExpiredCredsIsUsage(t *testing.T) {
	op := natsjwt.NewOperator(t)
	acc := op.Account(t, true, true)
	path, _ := natsjwt.CredsWith(t, t.TempDir(), "expired.creds", acc, nil,
		func(c *jwt.UserClaims) { c.Expires = time.Now().Add(-time.Hour).Unix() })
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": "nats://127.0.0.1:1", "NATS_CREDS": path},
		"--script", "s", "--instance", "i-1")
	if code != stopcli.ExitUsage || stdout != "" || !strings.Contains(stderr, "expired") {
		t.Errorf("exit %d, stdout %q, stderr %q; want %d, nothing, and the expiry", code, stdout, stderr, stopcli.ExitUsage)
	}
}

// worker stop reads the worker's environment, but only its NATS settings
// and names: a malformed variable that belongs to the worker alone must
// not stop it, while one it uses is still a usage error. (NATS is down
// here, so getting past the configuration ends in "no outcome".)
func TestOnlyNATSAndSubjectVariablesMatter(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + l.Addr().String()
	l.Close()
	for _, workerOnly := range []map[string]string{
		{"NATS_URL": url, "WORKER_CONCURRENCY": "abc", "DLF_TIMEOUT": "soon", "DLF_RATE_LIMIT": "fast",
			"RETRY_MAX_ELAPSED": "forever", "DLF_ENDPOINT": "::bad::", "STREAM_REPLICAS": "abc"},
		{"NATS_URL": url, "STREAM_REPLICAS": "6"},
	} {
		if code, _, stderr := runStop(t, workerOnly, "--script", "s", "--instance", "i-1", "--wait", "500ms"); code != stopcli.ExitNoOutcome {
			t.Errorf("%v: exit = %d (%s), want %d: worker-only variables were checked", workerOnly, code, stderr, stopcli.ExitNoOutcome)
		}
	}
	bad := map[string]string{"NATS_URL": url, "STOP_SUBJECT": "a b"}
	code, _, stderr := runStop(t, bad, "--script", "s", "--instance", "i-1", "--wait", "500ms")
	if code != stopcli.ExitUsage || !strings.Contains(stderr, "STOP_SUBJECT") {
		t.Errorf("STOP_SUBJECT=%q: exit = %d, stderr = %q; want %d naming it", "a b", code, stderr, stopcli.ExitUsage)
	}
}

// NATS down: no outcome can come, so the status is "no outcome" (the
// same line may be run again), and the message names the problem without
// the password.
func TestNATSUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "nats://" + l.Addr().String()
	l.Close() // nothing listens there any more
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": url, "NATS_USER": "u", "NATS_PASSWORD": "s3cret-pw"},
		"--script", "s", "--instance", "i-1", "--wait", "2s")
	if code != stopcli.ExitNoOutcome {
		t.Errorf("exit = %d, want %d", code, stopcli.ExitNoOutcome)
	}
	if stdout != "" || stderr == "" {
		t.Errorf("stdout = %q, stderr = %q; want nothing and an error", stdout, stderr)
	}
	if strings.Contains(stderr, "s3cret-pw") {
		t.Errorf("stderr holds the NATS password: %q", stderr)
	}
}

func TestNoWorkerTimesOut(t *testing.T) {
	ns, js := startStreams(t)

	start := time.Now()
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": ns.ClientURL()},
		"--script", "s", "--instance", "i-1", "--id", "no-worker-1", "--wait", "500ms")
	elapsed := time.Since(start)
	if code != stopcli.ExitNoOutcome {
		t.Errorf("exit = %d, want %d", code, stopcli.ExitNoOutcome)
	}
	if stdout != "" {
		t.Errorf("stdout = %q, want nothing", stdout)
	}
	for _, want := range []string{"command no-worker-1 was published (stream DLF_STOP, sequence 1)",
		"no outcome for it came within --wait 500ms", "may still be processed", "decided this id before"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr = %q, want %q", stderr, want)
		}
	}
	if elapsed < 500*time.Millisecond || elapsed > 5*time.Second {
		t.Errorf("took %s, want about --wait (500ms)", elapsed)
	}

	// The command was stored in the stop stream: a worker started later
	// would still get it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, config.DefaultStopStream)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := s.GetLastMsgForSubject(ctx, config.DefaultStopSubject)
	if err != nil {
		t.Fatalf("stored command: %v", err)
	}
	var body map[string]string
	if err := json.Unmarshal(msg.Data, &body); err != nil {
		t.Fatalf("stored command is not JSON: %v: %s", err, msg.Data)
	}
	want := map[string]string{"command_id": "no-worker-1", "script_name": "s", "instance_id": "i-1"}
	if len(body) != len(want) {
		t.Errorf("stored command = %v, want %v", body, want)
	}
	for k, v := range want {
		if body[k] != v {
			t.Errorf("stored command %s = %q, want %q", k, body[k], v)
		}
	}
	if got := msg.Header.Get(nats.MsgIdHdr); got != "no-worker-1" {
		t.Errorf("Nats-Msg-Id = %q, want no-worker-1", got)
	}

	// Without --id the id is new: nothing about an id decided before
	// (found by review: the only reason given, also here).
	_, _, stderr = runStop(t, map[string]string{"NATS_URL": ns.ClientURL()},
		"--script", "s", "--instance", "i-2", "--wait", "200ms")
	if !strings.Contains(stderr, "may still be processed") || strings.Contains(stderr, "decided this id before") {
		t.Errorf("stderr = %q; want it to say the command may still be processed, and nothing of a reused id", stderr)
	}
}

const (
	defaultProject = "default-project"
	otherProject   = "other-project"
	script         = "etl_daily"
)

// startWorker runs the real worker in-process against an embedded NATS
// and a DLF emulator, and stops it when the test ends.
func startWorker(t *testing.T) (natsURL string, emu *emulator.Emulator) {
	t.Helper()
	ns := testutil.StartNATS(t)
	emu, emuURL := emulator.StartForTest(t)

	cfg := config.Default()
	cfg.NATS.URL = ns.ClientURL()
	cfg.DLF.Endpoint = emuURL
	cfg.DLF.ProjectID = defaultProject
	cfg.DLF.Timeout = 2 * time.Second
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.ShutdownTimeout = 2 * time.Second
	if err := cfg.Validate(); err != nil {
		t.Fatalf("config: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- service.Run(ctx, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), service.Hooks{
			Started: func(string) { close(started) },
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("service.Run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("service.Run did not return within 15s of cancel")
		}
	})
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("service.Run returned before starting: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("worker did not start within 15s")
	}
	return ns.ClientURL(), emu
}

// predictable keeps the fields of o a test can know in advance; times,
// attempts and the worker id differ from run to run.
func predictable(o consumer.Outcome) consumer.Outcome {
	return consumer.Outcome{CommandID: o.CommandID, ProjectID: o.ProjectID, ScriptName: o.ScriptName, InstanceID: o.InstanceID,
		Status: o.Status, Cause: o.Cause, HTTPStatus: o.HTTPStatus, ErrorCode: o.ErrorCode}
}

// oneJSONLine checks stdout is exactly one line holding one JSON object.
func oneJSONLine(t *testing.T, stdout string) consumer.Outcome {
	t.Helper()
	line, ok := strings.CutSuffix(stdout, "\n")
	if !ok || line == "" || strings.Contains(line, "\n") {
		t.Fatalf("stdout = %q, want exactly one line", stdout)
	}
	var o consumer.Outcome
	if err := json.Unmarshal([]byte(line), &o); err != nil {
		t.Fatalf("stdout is not one JSON object: %v: %q", err, line)
	}
	return o
}

func TestWithWorker(t *testing.T) {
	natsURL, emu := startWorker(t)
	lookup := map[string]string{"NATS_URL": natsURL}

	t.Run("running instance is stopped", func(t *testing.T) {
		inst := emu.Execute(defaultProject, "", script)
		code, stdout, _ := runStop(t, lookup, "--script", script, "--instance", inst, "--id", "cli-stop-1", "--wait", "20s")
		if code != stopcli.ExitStopped {
			t.Errorf("exit = %d, want %d", code, stopcli.ExitStopped)
		}
		o := predictable(oneJSONLine(t, stdout))
		want := consumer.Outcome{CommandID: "cli-stop-1", ProjectID: defaultProject, ScriptName: script,
			InstanceID: inst, Status: "stopped", Cause: "ok", HTTPStatus: 204}
		if o != want {
			t.Errorf("outcome = %+v, want %+v", o, want)
		}
		if !emu.Stopped(defaultProject, script, inst) {
			t.Error("emulator: instance not stopped")
		}
	})

	t.Run("--project overrides the worker's default and the id is generated", func(t *testing.T) {
		inst := emu.Execute(otherProject, "", script)
		code, stdout, _ := runStop(t, lookup, "--script", script, "--instance", inst, "--project", otherProject)
		if code != stopcli.ExitStopped {
			t.Errorf("exit = %d, want %d", code, stopcli.ExitStopped)
		}
		o := oneJSONLine(t, stdout)
		if o.Status != "stopped" || o.ProjectID != otherProject || o.InstanceID != inst || o.CommandID == "" {
			t.Errorf("outcome = %+v, want stopped for %s/%s with a generated command id", o, otherProject, inst)
		}
		if !emu.Stopped(otherProject, script, inst) {
			t.Error("emulator: instance not stopped")
		}
	})

	t.Run("unknown instance fails", func(t *testing.T) {
		code, stdout, _ := runStop(t, lookup, "--script", script, "--instance", "no-such-instance", "--id", "cli-unknown-1")
		if code != stopcli.ExitOther {
			t.Errorf("exit = %d, want %d", code, stopcli.ExitOther)
		}
		o := oneJSONLine(t, stdout)
		if o.Status != "failed" || o.Cause != "dlf_error" || o.ErrorCode != "DLF.6205" || o.HTTPStatus != 400 ||
			o.CommandID != "cli-unknown-1" {
			t.Errorf("outcome = %+v, want failed, dlf_error, DLF.6205, 400, cli-unknown-1", o)
		}
	})

	t.Run("a value the worker would reject is bad usage", func(t *testing.T) {
		// A script name the command rules refuse: refused before it is
		// published, so no command, outcome or dead letter follows
		// (found by review: it was published, rejected and
		// dead-lettered, exit 1).
		calls := emu.StopCalls()
		code, stdout, stderr := runStop(t, lookup, "--script", "..", "--instance", "i-1", "--id", "cli-rejected-1")
		if code != stopcli.ExitUsage || stdout != "" || !strings.Contains(stderr, "--script") {
			t.Errorf("exit %d, stdout %q, stderr %q; want %d, nothing, and the flag named", code, stdout, stderr, stopcli.ExitUsage)
		}
		if got := emu.StopCalls(); got != calls {
			t.Errorf("DLF stop calls went from %d to %d, want no call", calls, got)
		}
	})

	// JetStream drops the second command as a duplicate; the first one's
	// outcome, stored before the second run began, is that id's outcome.
	t.Run("reused id within the duplicate window", func(t *testing.T) {
		inst := emu.Execute(defaultProject, "", script)
		code, first, _ := runStop(t, lookup, "--script", script, "--instance", inst, "--id", "cli-dup-1")
		if code != stopcli.ExitStopped {
			t.Fatalf("first stop: exit = %d, want %d", code, stopcli.ExitStopped)
		}
		calls := emu.StopCalls()
		code, stdout, stderr := runStop(t, lookup, "--script", script, "--instance", inst, "--id", "cli-dup-1", "--wait", "5s")
		if code != stopcli.ExitStopped {
			t.Errorf("exit = %d, want %d", code, stopcli.ExitStopped)
		}
		if stdout != first {
			t.Errorf("stdout = %q, want the first run's outcome %q", stdout, first)
		}
		if !strings.Contains(stderr, "command id cli-dup-1 was published already") {
			t.Errorf("stderr = %q, want it to say the id was published already", stderr)
		}
		if got := emu.StopCalls(); got != calls {
			t.Errorf("DLF stop calls went from %d to %d, want no call", calls, got)
		}
	})
}

// A user that may not read the outcome stream learns it before anything is
// published (a rerun would otherwise send a second command), whichever
// step of the reading it may not do; one that may not publish commands
// learns it at once, not after --wait.
func TestPermissionViolationsAreNamed(t *testing.T) {
	deny := func(pub string) *server.Permissions {
		return &server.Permissions{Publish: &server.SubjectPermission{Deny: []string{pub}}}
	}
	s := testutil.RunServer(t, &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), Users: []*server.User{
		{Username: "blind", Password: "blind-pw", Permissions: deny("$JS.API.STREAM.INFO." + config.DefaultOutcomeStream)},
		{Username: "deaf", Password: "deaf-pw", Permissions: deny("$JS.API.CONSUMER.CREATE." + config.DefaultOutcomeStream + ".>")},
		{Username: "nopull", Password: "nopull-pw", Permissions: deny("$JS.API.CONSUMER.MSG.NEXT." + config.DefaultOutcomeStream + ".>")},
		{Username: "nodelete", Password: "nodelete-pw", Permissions: deny("$JS.API.CONSUMER.DELETE." + config.DefaultOutcomeStream + ".>")},
		{Username: "mute", Password: "mute-pw", Permissions: deny(config.DefaultStopSubject)},
		{Username: "watcher", Password: "watcher-pw"},
	}})
	watcher, js := setUpStreams(t, s.ClientURL(), nats.UserInfo("watcher", "watcher-pw"))
	published, err := watcher.SubscribeSync(config.DefaultStopSubject)
	if err != nil {
		t.Fatal(err)
	}
	if err := watcher.Flush(); err != nil {
		t.Fatal(err)
	}
	const reading = ": nothing was published: the NATS user may not read the outcome stream"
	for _, tc := range []struct{ user, want string }{
		{"blind", "look up outcome stream DLF_STOP_OUTCOMES" + reading},
		{"deaf", "read outcome stream DLF_STOP_OUTCOMES" + reading},
		{"nopull", "read outcome stream DLF_STOP_OUTCOMES" + reading},
		{"nodelete", "read outcome stream DLF_STOP_OUTCOMES" + reading},
		{"mute", `publish to dlf.stop.request: the NATS user may not do this`},
	} {
		t.Run(tc.user, func(t *testing.T) {
			start := time.Now()
			code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": s.ClientURL(), "NATS_USER": tc.user, "NATS_PASSWORD": tc.user + "-pw"},
				"--script", "s", "--instance", "i", "--wait", "20s")
			if code != stopcli.ExitNoOutcome || stdout != "" {
				t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
			}
			if !strings.Contains(stderr, tc.want) || !strings.Contains(stderr, "Permissions Violation") || strings.Contains(stderr, tc.user+"-pw") {
				t.Errorf("stderr = %q; want %q and the violation, without the password", stderr, tc.want)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("took %s", took.Round(time.Millisecond))
			}
		})
	}
	if err := watcher.Flush(); err != nil {
		t.Fatal(err)
	}
	if m, err := published.NextMsg(0); err == nil {
		t.Errorf("a command was published: %s", m.Data)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, config.DefaultStopStream)
	if err != nil {
		t.Fatal(err)
	}
	if n := st.CachedInfo().State.Msgs; n != 0 {
		t.Errorf("stop stream holds %d commands; want none", n)
	}
}
