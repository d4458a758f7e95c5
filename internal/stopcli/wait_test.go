package stopcli_test

import (
	"context"
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/stopcli"
	"github.com/dlf-stop/worker/internal/testutil"
)

// startStreams runs a JetStream server with the worker's streams and
// consumer but no worker: commands wait in the stop stream, and the test
// stores outcomes itself.
func startStreams(t *testing.T) (*server.Server, jetstream.JetStream) {
	t.Helper()
	ns := testutil.StartNATS(t)
	_, js := setUpStreams(t, ns.ClientURL())
	return ns, js
}

// setUpStreams connects to url with opts and creates the worker's streams
// and consumer there, as the worker does at start.
func setUpStreams(t *testing.T, url string, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, js := testutil.ConnectJS(t, url, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := consumer.Setup(ctx, js, consumer.Config{}, zap.NewNop()); err != nil {
		t.Fatalf("consumer.Setup: %v", err)
	}
	return nc, js
}

// publishCommand stores a stop command under id, as a first `worker stop`
// with --id does.
func publishCommand(t *testing.T, js jetstream.JetStream, id string) *jetstream.PubAck {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := js.Publish(ctx, config.DefaultStopSubject, []byte(`{"command_id":"`+id+`","script_name":"s","instance_id":"i-1"}`), jetstream.WithMsgID(id))
	if err != nil || ack.Duplicate {
		t.Fatalf("publish command %s: %+v %v", id, ack, err)
	}
	return ack
}

// storeOutcome stores an outcome event for command id, as the worker does.
func storeOutcome(t *testing.T, js jetstream.JetStream, id, status string) {
	t.Helper()
	storeOutcomeOf(t, js, consumer.Outcome{CommandID: id, ScriptName: "s", InstanceID: "i-1", Status: status, Cause: "ok", HTTPStatus: 204})
}

// storeOutcomeOf stores outcome o, as the worker does.
func storeOutcomeOf(t *testing.T, js jetstream.JetStream, o consumer.Outcome) {
	t.Helper()
	body, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	id := o.CommandID
	m := nats.NewMsg(config.DefaultOutcomeSubjectPrefix + "." + o.Status)
	m.Header.Set(nats.MsgIdHdr, id)
	m.Data = body
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatalf("store outcome of %s: %v", id, err)
	}
}

// runStopCtx is runStop with a context the test may cancel, as Ctrl-C
// or SIGTERM cancel main's.
func runStopCtx(t *testing.T, ctx context.Context, lookup map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut strings.Builder
	code = stopcli.Run(ctx, args, env(lookup), &out, &errOut)
	t.Logf("worker stop %s -> %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out.String(), errOut.String())
	return code, out.String(), errOut.String()
}

// An outcome stored while `worker stop` is cut off from NATS (a server
// restart, a dropped link) is read once it is connected again. Listening
// to outcomes as they were published, it missed that one, waited out
// --wait and exited 2, and a rerun without --id sent a second command.
func TestOutcomeStoredWhileDisconnectedIsRead(t *testing.T) {
	ns, js := startStreams(t)
	p := startProxy(t, ns.Addr().String())
	const id = "cut-1"
	stopcli.SetPublishedHook(t, func() {
		p.cut()
		storeOutcome(t, js, "someone-else", "failed")
		storeOutcome(t, js, id, "stopped")
		p.restore()
	})
	start := time.Now()
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": p.URL()},
		"--script", "s", "--instance", "i-1", "--id", id, "--wait", "15s")
	if code != stopcli.ExitStopped || stderr != "" {
		t.Errorf("exit %d, stderr %q; want %d and nothing", code, stderr, stopcli.ExitStopped)
	}
	if o := oneJSONLine(t, stdout); o.CommandID != id || o.Status != "stopped" {
		t.Errorf("outcome %+v; want %s's, stopped", o, id)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("took %s; the outcome was stored at once", took.Round(time.Millisecond))
	}
}

// The same --id again within the stop stream's duplicate window: JetStream
// keeps the command published then and drops this one. worker stop follows
// that command: it prints its outcome, stored before or after this run
// began, and only --wait ends the wait. It used to exit 2 at once, saying
// the outcome "was sent then", even when there was none yet.
func TestDuplicateFollowsTheCommandPublishedBefore(t *testing.T) {
	ns, js := startStreams(t)
	lookup := map[string]string{"NATS_URL": ns.ClientURL()}
	var seq uint64 // stop stream sequence of the last command published
	wantDuplicateNote := func(t *testing.T, stderr, id string) {
		t.Helper()
		for _, want := range []string{"command id " + id + " was published already", "duplicate window", "sequence " + strconv.FormatUint(seq, 10), "stored nothing new"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr %q; want %q", stderr, want)
			}
		}
		if strings.Contains(stderr, "was sent then") {
			t.Errorf("stderr %q claims an outcome was sent", stderr)
		}
	}

	// sameCommand runs the stop for s/i-1 under id, in env, and expects
	// the earlier command's outcome, of status, printed with the note.
	sameCommand := func(t *testing.T, env map[string]string, id, status string, code int) {
		t.Helper()
		got, stdout, stderr := runStop(t, env, "--script", "s", "--instance", "i-1", "--id", id, "--wait", "10s")
		if got != code {
			t.Errorf("exit %d; want %d", got, code)
		}
		if o := oneJSONLine(t, stdout); o.CommandID != id || o.Status != status {
			t.Errorf("outcome %+v; want %s's, %s", o, id, status)
		}
		wantDuplicateNote(t, stderr, id)
	}

	t.Run("outcome stored before this run", func(t *testing.T) {
		const id = "dup-before"
		seq = publishCommand(t, js, id).Sequence
		storeOutcome(t, js, id, "stopped")
		storeOutcome(t, js, "dup-other", "failed") // stored later, another command's
		sameCommand(t, lookup, id, "stopped", stopcli.ExitStopped)
	})

	// The earlier command named another instance: its outcome says
	// nothing of the one asked for (found by review: exit 0).
	t.Run("earlier command for another instance", func(t *testing.T) {
		const id = "dup-other-instance"
		seq = publishCommand(t, js, id).Sequence // for i-1
		storeOutcome(t, js, id, "stopped")
		code, stdout, stderr := runStop(t, lookup, "--script", "s", "--instance", "i-OTHER", "--id", id, "--wait", "10s")
		if code != stopcli.ExitNoOutcome || stdout != "" {
			t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
		}
		if !strings.Contains(stderr, "for another instance") || !strings.Contains(stderr, `instance "i-1"`) {
			t.Errorf("stderr %q; want it to say the id was another instance's", stderr)
		}
	})

	// A project left out is the worker's default, named in the same
	// environment (found by review: another project's outcome read as
	// this one's).
	// anotherInstance stores o as the outcome of an earlier command with
	// its id, runs the stop for s/i-1 with that id and project as the
	// default, and expects to be told the id was another instance's.
	anotherInstance := func(t *testing.T, o consumer.Outcome, project string) {
		t.Helper()
		seq = publishCommand(t, js, o.CommandID).Sequence
		storeOutcomeOf(t, js, o)
		env := map[string]string{"NATS_URL": lookup["NATS_URL"], "HUAWEICLOUD_SDK_PROJECT_ID": project}
		code, stdout, stderr := runStop(t, env, "--script", "s", "--instance", "i-1", "--id", o.CommandID, "--wait", "10s")
		if code != stopcli.ExitNoOutcome || stdout != "" || !strings.Contains(stderr, "for another instance") {
			t.Errorf("exit %d, stdout %q, stderr %q; want %d, nothing, and why", code, stdout, stderr, stopcli.ExitNoOutcome)
		}
	}
	t.Run("earlier command for another project", func(t *testing.T) {
		anotherInstance(t, consumer.Outcome{CommandID: "dup-other-project", ProjectID: "P-OTHER", ScriptName: "s", InstanceID: "i-1",
			Status: "stopped", Cause: "ok"}, "P-DEFAULT")
	})

	// A rejected outcome leaves out what broke its rule (here the
	// project: the worker had no default). It is the same command when
	// what it names matches (found by review: exit 2, "another instance").
	t.Run("earlier command rejected", func(t *testing.T) {
		const id = "dup-rejected"
		seq = publishCommand(t, js, id).Sequence
		storeOutcomeOf(t, js, consumer.Outcome{CommandID: id, ScriptName: "s", InstanceID: "i-1", Status: "rejected", Cause: "invalid_command"})
		sameCommand(t, map[string]string{"NATS_URL": lookup["NATS_URL"], "HUAWEICLOUD_SDK_PROJECT_ID": "P-DEFAULT"},
			id, "rejected", stopcli.ExitOther)
	})

	// A rejected command that left out an instance had an invalid one,
	// which --instance, checked before publishing, cannot be: another
	// command (found by review: printed as this one's, exit 1).
	t.Run("earlier rejected command for an invalid instance", func(t *testing.T) {
		anotherInstance(t, consumer.Outcome{CommandID: "dup-rejected-other", ProjectID: "P", ScriptName: "s",
			Status: "rejected", Cause: "invalid_command"}, "P")
	})

	t.Run("outcome stored while it waits", func(t *testing.T) {
		const id = "dup-later"
		seq = publishCommand(t, js, id).Sequence
		type ran struct {
			code           int
			stdout, stderr string
		}
		done := make(chan ran, 1)
		finished := make(chan struct{})
		t.Cleanup(func() { <-finished })
		go func() {
			defer close(finished)
			var r ran
			r.code, r.stdout, r.stderr = runStop(t, lookup, "--script", "s", "--instance", "i-1", "--id", id, "--wait", "20s")
			done <- r
		}()
		// It reads from before this run once it knows it published a
		// duplicate: then the outcome comes.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		testutil.WaitFor(t, 10*time.Second, "worker stop reading the outcome stream from a start time", func() bool {
			select {
			case r := <-done:
				done <- r
				return true // returned already: checked below
			default:
			}
			st, err := js.Stream(ctx, config.DefaultOutcomeStream)
			if err != nil {
				return false
			}
			for ci := range st.ListConsumers(ctx).Info() {
				if ci.Config.DeliverPolicy == jetstream.DeliverByStartTimePolicy {
					return true
				}
			}
			return false
		})
		storeOutcome(t, js, id, "failed")
		var r ran
		select {
		case r = <-done:
		case <-time.After(20 * time.Second):
			t.Fatal("worker stop did not return")
		}
		if r.code != stopcli.ExitOther {
			t.Errorf("exit %d; want %d", r.code, stopcli.ExitOther)
		}
		if o := oneJSONLine(t, r.stdout); o.CommandID != id || o.Status != "failed" {
			t.Errorf("outcome %+v; want %s's, failed", o, id)
		}
		wantDuplicateNote(t, r.stderr, id)
	})

	t.Run("no outcome within --wait", func(t *testing.T) {
		const id = "dup-none"
		seq = publishCommand(t, js, id).Sequence
		start := time.Now()
		code, stdout, stderr := runStop(t, lookup, "--script", "s", "--instance", "i-1", "--id", id, "--wait", "1s")
		took := time.Since(start)
		if code != stopcli.ExitNoOutcome || stdout != "" {
			t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
		}
		if took < time.Second {
			t.Errorf("returned after %s; want it to wait out --wait 1s", took.Round(time.Millisecond))
		}
		wantDuplicateNote(t, stderr, id)
		if !strings.Contains(stderr, "--wait 1s") || !strings.Contains(stderr, "no outcome") {
			t.Errorf("stderr %q; want it to say no outcome came within --wait 1s", stderr)
		}
	})
}

// Ctrl-C or SIGTERM while waiting is an interrupt, not a timeout: the
// message says the command was published, where, and that it may still be
// processed, without the timeout's hint about reused ids. It used to say
// "no outcome within 30s".
func TestInterruptIsNamed(t *testing.T) {
	ns, js := startStreams(t)
	ctx, interrupt := context.WithCancel(context.Background())
	defer interrupt()
	stopcli.SetPublishedHook(t, interrupt)
	start := time.Now()
	code, stdout, stderr := runStopCtx(t, ctx, map[string]string{"NATS_URL": ns.ClientURL()},
		"--script", "s", "--instance", "i-1", "--id", "int-1", "--wait", "30s")
	if code != stopcli.ExitNoOutcome || stdout != "" {
		t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
	}
	for _, want := range []string{"interrupted", "command int-1 was published", "stream DLF_STOP, sequence 1", "may still be processed"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr %q; want %q", stderr, want)
		}
	}
	for _, wrong := range []string{"no outcome", "STATE_TTL", "--wait"} {
		if strings.Contains(stderr, wrong) {
			t.Errorf("stderr %q says %q: an interrupt is not a timeout", stderr, wrong)
		}
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("took %s after the interrupt", took.Round(time.Millisecond))
	}
	// The command is stored all the same.
	st, err := js.Stream(context.Background(), config.DefaultStopStream)
	if err != nil {
		t.Fatal(err)
	}
	if n := st.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("stop stream holds %d commands; want the one published", n)
	}
}

// silentServer accepts connections and never answers: a NATS server that
// hangs, or a link that drops everything. accepted receives a value per
// connection.
func silentServer(t *testing.T) (url string, accepted <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan struct{}, 16)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "nats://" + ln.Addr().String(), ch
}

// Before anything is published, an interrupt and --wait are told apart
// too, and both say nothing was published.
func TestEndedWhileConnecting(t *testing.T) {
	t.Run("--wait runs out", func(t *testing.T) {
		url, _ := silentServer(t)
		code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": url}, "--script", "s", "--instance", "i-1", "--wait", "500ms")
		if code != stopcli.ExitNoOutcome || stdout != "" {
			t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
		}
		if !strings.Contains(stderr, "connect nats: --wait 500ms ran out") {
			t.Errorf("stderr %q; want it to name --wait 500ms", stderr)
		}
	})
	t.Run("interrupted", func(t *testing.T) {
		url, accepted := silentServer(t)
		ctx, interrupt := context.WithCancel(context.Background())
		defer interrupt()
		go func() {
			select {
			case <-accepted:
				interrupt()
			case <-ctx.Done():
			}
		}()
		code, stdout, stderr := runStopCtx(t, ctx, map[string]string{"NATS_URL": url}, "--script", "s", "--instance", "i-1", "--wait", "30s")
		if code != stopcli.ExitNoOutcome || stdout != "" {
			t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout, stopcli.ExitNoOutcome)
		}
		if !strings.Contains(stderr, "interrupted while connecting to NATS: nothing was published") {
			t.Errorf("stderr %q; want the interrupt named", stderr)
		}
	})
}

// A duplicate --id whose earlier command's outcome the outcome stream's
// limits have dropped is not said to be unprocessed (found by review).
func TestDuplicateWhoseOutcomeWasDropped(t *testing.T) {
	ns := testutil.StartNATS(t)
	_, js := testutil.ConnectJS(t, ns.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: config.DefaultOutcomeStream,
		Subjects: []string{config.DefaultOutcomeSubjectPrefix + ".*"}, MaxMsgs: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := consumer.Setup(ctx, js, consumer.Config{}, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	const id = "dropped-1"
	publishCommand(t, js, id)
	storeOutcome(t, js, id, "stopped")
	storeOutcome(t, js, "someone-else", "failed") // the stream keeps one: dropped-1's goes
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": ns.ClientURL()},
		"--script", "s", "--instance", "i-1", "--id", id, "--wait", "1s")
	if code != stopcli.ExitNoOutcome || stdout != "" || !strings.Contains(stderr, "its limits dropped them") ||
		strings.Contains(stderr, "may not have been processed yet") {
		t.Errorf("exit %d, stdout %q, stderr %q; want %d, nothing, and that outcomes were dropped", code, stdout, stderr, stopcli.ExitNoOutcome)
	}
}

// A command with the same id, for another instance, that JetStream did not
// drop as a duplicate (published without Nats-Msg-Id, as the README's
// `nats pub` line is, or longer ago than the duplicate window) and that
// the worker was still retrying: its outcome, stored after this run
// published, carries the id, but the worker takes this run's command as a
// reused id and stops nothing for it. worker stop printed that outcome and
// exited 0 (found by review).
func TestReusedIDOfACommandForAnotherInstance(t *testing.T) {
	ns, js := startStreams(t)
	const id = "reused-3"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.Publish(ctx, config.DefaultStopSubject, []byte(`{"command_id":"`+id+`","script_name":"s","instance_id":"i-1"}`)); err != nil {
		t.Fatal(err)
	}
	stopcli.SetPublishedHook(t, func() { storeOutcome(t, js, id, "stopped") }) // the earlier command ends
	code, stdout, stderr := runStop(t, map[string]string{"NATS_URL": ns.ClientURL()},
		"--script", "s", "--instance", "i-OTHER", "--id", id, "--wait", "10s")
	if code != stopcli.ExitNoOutcome || stdout != "" {
		t.Errorf("exit %d, stdout %q; want %d and nothing: i-OTHER was not stopped", code, stdout, stopcli.ExitNoOutcome)
	}
	if !strings.Contains(stderr, "another command's, for another instance") || !strings.Contains(stderr, `instance "i-1"`) {
		t.Errorf("stderr %q; want it to say the id was another instance's command", stderr)
	}
}
