package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/stopcli"
	"github.com/dlf-stop/worker/internal/testutil"
)

// startConfServer runs nats-server in-process with the accounts, users and
// permissions of nats-server.conf, as one local node: no cluster, random
// port, no monitoring port, store in a temporary directory.
func startConfServer(t *testing.T) *server.Server {
	t.Helper()
	opts := loadNATSConf(t)
	opts.Cluster = server.ClusterOpts{}
	opts.Routes = nil
	opts.RoutesStr = ""
	opts.Host = "127.0.0.1"
	opts.Port = -1
	opts.HTTPHost = ""
	opts.HTTPPort = 0
	opts.StoreDir = t.TempDir()
	return testutil.RunServer(t, opts)
}

// natsUser is a connection as one user of nats-server.conf. Permission
// violations the server reports arrive on violations.
type natsUser struct {
	name       string
	nc         *nats.Conn
	js         jetstream.JetStream
	violations chan string

	mu         sync.Mutex
	unexpected []string
}

func connectAs(t *testing.T, s *server.Server, user string) *natsUser {
	t.Helper()
	u := &natsUser{name: user, violations: make(chan string, 64)}
	nc, err := nats.Connect(s.ClientURL(),
		nats.UserInfo(user, envSentinel(passwordVar(user))),
		nats.Name("deploy-test-"+user),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(err.Error(), "Permissions Violation") {
				u.violations <- err.Error()
				return
			}
			u.mu.Lock()
			u.unexpected = append(u.unexpected, err.Error())
			u.mu.Unlock()
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	u.nc = nc
	if u.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	return u
}

// passwordVar is the variable nats-server.conf takes user's password from.
func passwordVar(user string) string {
	return map[string]string{
		"dlf-worker": "DLF_WORKER_PASSWORD",
		"scheduler":  "DLF_SCHEDULER_PASSWORD",
		"auditor":    "DLF_AUDITOR_PASSWORD",
		"dlf-admin":  "DLF_ADMIN_PASSWORD",
	}[user]
}

// denied publishes to (op "pub") or subscribes to (op "sub") subject and
// expects the server to refuse it.
func (u *natsUser) denied(t *testing.T, op, subject string) {
	t.Helper()
	switch op {
	case "pub":
		if err := u.nc.Publish(subject, []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	case "sub":
		sub, err := u.nc.SubscribeSync(subject)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = sub.Unsubscribe() }()
	}
	if err := u.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(5 * time.Second)
	for {
		select {
		case v := <-u.violations:
			if strings.Contains(v, `"`+subject+`"`) {
				return
			}
			t.Errorf("%s: unexpected permission violation %q", u.name, v)
		case <-timeout:
			t.Errorf("%s may %s %q; want it denied", u.name, op, subject)
			return
		}
	}
}

// noViolations fails on any violation or error reported so far: every
// operation the user was expected to be allowed went through.
func (u *natsUser) noViolations(t *testing.T) {
	t.Helper()
	if err := u.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case v := <-u.violations:
			t.Errorf("%s: %s", u.name, v)
		default:
			u.mu.Lock()
			defer u.mu.Unlock()
			for _, e := range u.unexpected {
				t.Errorf("%s: async error %s", u.name, e)
			}
			return
		}
	}
}

// apiRequest sends a JetStream API request as nats does for
// `nats stream add --config` and fails on an error answer.
// storeFailedOutcome stores a failed outcome for command id as u, the way
// the worker does, and returns it.
func (u *natsUser) storeFailedOutcome(ctx context.Context, t *testing.T, id string, command []byte) *nats.Msg {
	t.Helper()
	// What the command names, as the worker's outcome echoes it: worker
	// stop checks that the outcome is this command's.
	var o map[string]any
	if err := json.Unmarshal(command, &o); err != nil {
		t.Fatalf("command %s: %v", id, err)
	}
	o["command_id"], o["status"] = id, "failed"
	delete(o, "reason")
	data, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	out := nats.NewMsg(outcomePrefix + ".failed")
	out.Header.Set(nats.MsgIdHdr, id)
	out.Data = data
	if _, err := u.js.PublishMsg(ctx, out); err != nil {
		t.Fatalf("publish outcome: %v", err)
	}
	return out
}

func apiRequest(t *testing.T, u *natsUser, subject string, body any) {
	t.Helper()
	data, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := u.nc.Request(subject, data, 5*time.Second)
	if err != nil {
		t.Fatalf("%s: request %s: %v", u.name, subject, err)
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		t.Fatalf("%s: %s answered %q: %v", u.name, subject, msg.Data, err)
	}
	if resp.Error != nil {
		t.Fatalf("%s: %s: %d %s", u.name, subject, resp.Error.Code, resp.Error.Description)
	}
}

// definition reads a stream or consumer file as a JSON object with
// num_replicas set for a single node.
func definition(t *testing.T, files map[string][]byte, file string, replicas int) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(files[file], &m); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	m["num_replicas"] = replicas
	return m
}

func fetchOne(t *testing.T, c jetstream.Consumer) jetstream.Msg {
	t.Helper()
	batch, err := c.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	for m := range batch.Messages() {
		return m
	}
	t.Fatalf("fetch: no message (%v)", batch.Error())
	return nil
}

// TestNATSPermissions starts nats-server with nats-server.conf and runs
// each user's job through the real client library: the operator's
// bootstrap from the definition files with the worker's credentials, the
// worker's own start-up (consumer.Setup), a scheduler publishing, the
// worker processing, an auditor reading. Then it tries what each user must
// not do.
func TestNATSPermissions(t *testing.T) {
	s := startConfServer(t)
	worker := connectAs(t, s, "dlf-worker")
	scheduler := connectAs(t, s, "scheduler")
	auditor := connectAs(t, s, "auditor")
	// Each step gets its own deadline: a denied request is only noticed
	// when its deadline passes, so a short one keeps a failure quick.
	stepCtx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		return ctx
	}

	files := readStreamFiles(t)
	t.Run("operator creates the streams and consumer from the definitions", func(t *testing.T) {
		for _, w := range wantStreams() {
			apiRequest(t, worker, "$JS.API.STREAM.CREATE."+w.name, definition(t, files, w.name+".json", 1))
		}
		// As `nats consumer add DLF_STOP --config dlf-stop-worker.json`.
		apiRequest(t, worker, fmt.Sprintf("$JS.API.CONSUMER.CREATE.%s.%s.%s", stopStream, consumerName, stopSubject), map[string]any{
			"stream_name": stopStream,
			"config":      definition(t, files, consumerFile, 0),
			"action":      "create",
		})
	})

	var cons jetstream.Consumer
	t.Run("worker start-up binds them", func(t *testing.T) {
		ctx := stepCtx(t)
		var err error
		cons, err = consumer.Setup(ctx, worker.js, consumer.Config{Replicas: 1}, zap.NewNop())
		if err != nil {
			t.Fatalf("consumer.Setup as dlf-worker: %v", err)
		}
	})
	if cons == nil {
		t.FailNow()
	}

	t.Run("worker start-up creates what is missing", func(t *testing.T) {
		ctx := stepCtx(t)
		// A second server, empty: Setup must be able to create everything.
		s2 := startConfServer(t)
		w2 := connectAs(t, s2, "dlf-worker")
		if _, err := consumer.Setup(ctx, w2.js, consumer.Config{Replicas: 1}, zap.NewNop()); err != nil {
			t.Fatalf("consumer.Setup as dlf-worker on an empty server: %v", err)
		}
		w2.noViolations(t)
	})

	// Found by review: an operator who created the outcome stream with
	// `nats stream add` has direct gets on, and clients then read by
	// sequence through them; the worker's read-back of a stored outcome
	// and an auditor's first step of a redrive were refused.
	t.Run("reads by sequence where the streams allow direct gets", func(t *testing.T) {
		ctx := stepCtx(t)
		s3 := startConfServer(t)
		w3, a3 := connectAs(t, s3, "dlf-worker"), connectAs(t, s3, "auditor")
		for _, name := range []string{stopStream, outcomeStream, deadStream} {
			def := definition(t, files, name+".json", 1)
			def["allow_direct"] = true
			apiRequest(t, w3, "$JS.API.STREAM.CREATE."+name, def)
		}
		for _, subj := range []string{outcomePrefix + ".stopped", deadSubject} {
			if _, err := w3.js.Publish(ctx, subj, []byte(`{}`)); err != nil {
				t.Fatalf("publish to %s: %v", subj, err)
			}
		}
		// A stop command, which the worker reads back by its sequence
		// when it arrived without its body (found by review: that grant
		// was not tested).
		sc3 := connectAs(t, s3, "scheduler")
		if _, err := sc3.js.Publish(ctx, stopSubject, []byte(`{}`)); err != nil {
			t.Fatalf("publish to %s: %v", stopSubject, err)
		}
		for _, r := range []struct {
			u      *natsUser
			stream string
		}{{w3, stopStream}, {w3, outcomeStream}, {a3, outcomeStream}, {a3, deadStream}} {
			st, err := r.u.js.Stream(ctx, r.stream)
			if err != nil {
				t.Fatalf("%s: look up %s: %v", r.u.name, r.stream, err)
			}
			if !st.CachedInfo().Config.AllowDirect {
				t.Fatalf("%s does not allow direct gets", r.stream)
			}
			if _, err := st.GetMsg(ctx, 1); err != nil {
				t.Errorf("%s: get %s #1: %v", r.u.name, r.stream, err)
			}
		}
		w3.noViolations(t)
		a3.noViolations(t)
		sc3.noViolations(t)
	})

	t.Run("worker keeps per-command state", func(t *testing.T) {
		ctx := stepCtx(t)
		// Setup created the bucket (the empty-server run above proves the
		// creation); the worker reads keys and writes them with stored-ack
		// publishes, sync and async.
		kv, err := worker.js.KeyValue(ctx, stateBucket)
		if err != nil {
			t.Fatalf("look up bucket: %v", err)
		}
		if _, err := kv.Create(ctx, "cmd.c1", []byte("sent")); err != nil {
			t.Fatalf("create key: %v", err)
		}
		if _, err := worker.js.PublishMsg(ctx, &nats.Msg{Subject: "$KV." + stateBucket + ".cmd.c1", Data: []byte("decided")}); err != nil {
			t.Fatalf("put key: %v", err)
		}
		f, err := worker.js.PublishMsgAsync(&nats.Msg{Subject: "$KV." + stateBucket + ".inst.i1", Data: []byte("stopped")})
		if err != nil {
			t.Fatalf("put key async: %v", err)
		}
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatalf("put key async: %v", err)
		case <-ctx.Done():
			t.Fatal("put key async: no stored-ack")
		}
		// The re-read after a DLF.6205 asks the bucket's stream leader.
		apiRequest(t, worker, "$JS.API.STREAM.MSG.GET.KV_"+stateBucket, map[string]string{"last_by_subj": "$KV." + stateBucket + ".inst.i1"})
		if e, err := kv.Get(ctx, "cmd.c1"); err != nil || string(e.Value()) != "decided" {
			t.Fatalf("get key: %v %v", e, err)
		}
		if _, err := kv.Get(ctx, "cmd.none"); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Fatalf("get missing key: %v", err)
		}
		if err := kv.Delete(ctx, "cmd.c1"); err != nil {
			t.Fatalf("delete key: %v", err)
		}
	})

	t.Run("scheduler publishes, worker processes", func(t *testing.T) {
		ctx := stepCtx(t)
		// As a scheduler that listens to outcomes live (core NATS) before
		// publishing.
		outcomes, err := scheduler.nc.SubscribeSync(outcomePrefix + ".*")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = outcomes.Unsubscribe() }()
		if err := scheduler.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"c1", "c2"} {
			ack, err := scheduler.js.Publish(ctx, stopSubject, []byte(`{"script_name":"s","instance_id":"i"}`), jetstream.WithMsgID(id))
			if err != nil || ack.Stream != stopStream {
				t.Fatalf("scheduler publish: %v %v", ack, err)
			}
		}
		// Return the first one (shutdown), take it again.
		m := fetchOne(t, cons)
		if err := m.Nak(); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			m := fetchOne(t, cons)
			if err := m.InProgress(); err != nil {
				t.Fatal(err)
			}
			id := m.Headers().Get(nats.MsgIdHdr)
			// A command that arrives without its body is read back by
			// its sequence, in whichever form the client chooses.
			meta, err := m.Metadata()
			if err != nil {
				t.Fatal(err)
			}
			apiRequest(t, worker, "$JS.API.STREAM.MSG.GET."+stopStream, map[string]uint64{"seq": meta.Sequence.Stream})
			stop, err := worker.js.Stream(ctx, stopStream)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := stop.GetMsg(ctx, meta.Sequence.Stream); err != nil || !bytes.Equal(got.Data, m.Data()) {
				t.Fatalf("read the command back: %v %v", got, err)
			}
			worker.storeFailedOutcome(ctx, t, id, m.Data())
			dead := nats.NewMsg(deadSubject)
			dead.Header.Set(nats.MsgIdHdr, id)
			dead.Header.Set("Dlf-Status", "failed")
			dead.Data = m.Data()
			if _, err := worker.js.PublishMsg(ctx, dead); err != nil {
				t.Fatalf("publish dead letter: %v", err)
			}
			if err := m.DoubleAck(ctx); err != nil {
				t.Fatalf("ack: %v", err)
			}
		}
		st, err := worker.js.Stream(ctx, stopStream)
		if err != nil {
			t.Fatal(err)
		}
		if info, err := st.Info(ctx); err != nil || info.State.Msgs != 0 {
			t.Fatalf("work queue after acks: %+v %v; want empty", info, err)
		}
		for range 2 {
			if m, err := outcomes.NextMsg(5 * time.Second); err != nil {
				t.Fatalf("scheduler waiting for outcomes: %v", err)
			} else if m.Subject != outcomePrefix+".failed" {
				t.Errorf("scheduler got an outcome on %s", m.Subject)
			}
		}
	})

	// `worker stop` as the scheduler reads the outcome from the outcome
	// stream: stream info, an ordered consumer filtered to the outcome
	// subjects (create, pull), deleted when it ends. Each of these refused
	// fails it: the first three before it publishes, the delete by the
	// consumer it leaves behind.
	t.Run("worker stop as the scheduler", func(t *testing.T) {
		ctx := stepCtx(t)
		outcomes, err := worker.js.Stream(ctx, outcomeStream)
		if err != nil {
			t.Fatal(err)
		}
		consumersBefore := outcomes.CachedInfo().State.Consumers
		env := map[string]string{"NATS_URL": s.ClientURL(), "NATS_USER": "scheduler", "NATS_PASSWORD": envSentinel(passwordVar("scheduler"))}
		type ran struct {
			code           int
			stdout, stderr string
		}
		done := make(chan ran, 1)
		go func() {
			var out, errOut strings.Builder
			code := stopcli.Run(context.Background(), []string{"--script", "s", "--instance", "i", "--id", "cli-c3", "--wait", "20s"},
				func(k string) (string, bool) { v, ok := env[k]; return v, ok }, &out, &errOut)
			done <- ran{code, out.String(), errOut.String()}
		}()
		// The worker's part. No command comes when worker stop gave up
		// before publishing: its message says why.
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatalf("fetch: %v", err)
		}
		m, ok := <-batch.Messages()
		if !ok {
			select {
			case r := <-done:
				t.Fatalf("worker stop published no command: exit %d, stderr %q", r.code, r.stderr)
			case <-ctx.Done():
				t.Fatalf("worker stop published no command (%v) and did not return", batch.Error())
			}
		}
		id := m.Headers().Get(nats.MsgIdHdr)
		out := worker.storeFailedOutcome(ctx, t, id, m.Data())
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatalf("ack: %v", err)
		}
		var r ran
		select {
		case r = <-done:
		case <-ctx.Done():
			t.Fatal("worker stop did not return")
		}
		if id != "cli-c3" || r.code != stopcli.ExitOther || r.stdout != string(out.Data)+"\n" || r.stderr != "" {
			t.Errorf("worker stop sent %q, exit %d, stdout %q, stderr %q; want cli-c3, %d, its outcome and nothing",
				id, r.code, r.stdout, r.stderr, stopcli.ExitOther)
		}
		testutil.WaitFor(t, 5*time.Second, "worker stop's consumer deleted", func() bool {
			info, err := outcomes.Info(ctx)
			return err == nil && info.State.Consumers == consumersBefore
		})
	})

	t.Run("auditor reads outcomes and dead letters", func(t *testing.T) {
		ctx := stepCtx(t)
		oc, err := auditor.js.OrderedConsumer(ctx, outcomeStream, jetstream.OrderedConsumerConfig{})
		if err != nil {
			t.Fatalf("ordered consumer on outcomes: %v", err)
		}
		if m := fetchOne(t, oc); m.Subject() != outcomePrefix+".failed" {
			t.Errorf("outcome on %s", m.Subject())
		}
		dc, err := auditor.js.CreateConsumer(ctx, deadStream, jetstream.ConsumerConfig{
			Durable: "audit", AckPolicy: jetstream.AckExplicitPolicy,
		})
		if err != nil {
			t.Fatalf("durable consumer on dead letters: %v", err)
		}
		m := fetchOne(t, dc)
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatalf("ack dead letter: %v", err)
		}
		st, err := auditor.js.Stream(ctx, deadStream)
		if err != nil {
			t.Fatal(err)
		}
		if raw, err := st.GetMsg(ctx, 1); err != nil || raw.Header.Get("Dlf-Status") != "failed" {
			t.Fatalf("get dead letter 1: %v %v", raw, err)
		}
		if err := auditor.js.DeleteConsumer(ctx, deadStream, "audit"); err != nil {
			t.Fatalf("delete own consumer: %v", err)
		}
	})

	// The README sends an operator to `nats stream edit` and `nats
	// consumer edit`; no user of the account could (found by review).
	admin := connectAs(t, s, "dlf-admin")
	t.Run("an operator edits the streams and the consumer", func(t *testing.T) {
		ctx := stepCtx(t)
		for _, name := range []string{outcomeStream, deadStream} {
			st, err := admin.js.Stream(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			cfg := st.CachedInfo().Config
			cfg.Duplicates = 5 * time.Minute
			if _, err := admin.js.UpdateStream(ctx, cfg); err != nil {
				t.Fatalf("nats stream edit %s: %v", name, err)
			}
		}
		c, err := admin.js.Consumer(ctx, stopStream, consumerName)
		if err != nil {
			t.Fatal(err)
		}
		cfg := c.CachedInfo().Config
		cfg.MaxAckPending *= 2
		if _, err := admin.js.UpdateConsumer(ctx, stopStream, cfg); err != nil {
			t.Fatalf("nats consumer edit: %v", err)
		}
	})

	for _, u := range []*natsUser{worker, scheduler, auditor, admin} {
		u.noViolations(t)
	}

	// What each must not do. Streams and consumers exist now, so a denied
	// subject that went through would do real damage and show here.
	denials := []struct {
		user    *natsUser
		op      string
		subject string
	}{
		{worker, "pub", stopSubject},
		{worker, "pub", outcomePrefix + ".stopped.extra"},
		{worker, "pub", "$JS.API.STREAM.DELETE." + stopStream},
		{worker, "pub", "$JS.API.STREAM.UPDATE." + stopStream},
		{worker, "pub", "$JS.API.STREAM.PURGE." + outcomeStream},
		{worker, "pub", "$JS.API.STREAM.MSG.DELETE." + deadStream},
		{worker, "pub", "$JS.API.STREAM.UPDATE.KV_" + stateBucket},
		{worker, "pub", "$JS.API.CONSUMER.DELETE." + stopStream + "." + consumerName},
		{worker, "pub", "$JS.API.CONSUMER.CREATE." + stopStream + ".other"},
		{worker, "pub", "$JS.API.CONSUMER.CREATE." + outcomeStream + ".x"},
		{worker, "pub", "$JS.API.CONSUMER.MSG.NEXT." + stopStream + ".other"},
		{worker, "pub", "$JS.API.STREAM.CREATE.OTHER"},
		{worker, "pub", "$KV.other_bucket.k"},
		{worker, "sub", "dlf.stop.>"},
		{worker, "sub", ">"},

		{scheduler, "pub", outcomePrefix + ".stopped"},
		{scheduler, "pub", deadSubject},
		{scheduler, "pub", "$JS.API.STREAM.INFO." + stopStream},
		{scheduler, "pub", "$JS.API.CONSUMER.MSG.NEXT." + stopStream + "." + consumerName},
		{scheduler, "pub", "$JS.ACK." + stopStream + "." + consumerName + ".1.1.1.1.1.0"},
		{scheduler, "pub", "$KV." + stateBucket + ".k"},
		// Only the outcome stream, only what `worker stop` does there.
		{scheduler, "pub", "$JS.API.STREAM.INFO." + deadStream},
		{scheduler, "pub", "$JS.API.STREAM.MSG.GET." + outcomeStream},
		{scheduler, "pub", "$JS.API.CONSUMER.CREATE." + outcomeStream + ".unfiltered"},
		{scheduler, "pub", "$JS.API.CONSUMER.CREATE." + outcomeStream + ".x." + deadSubject},
		{scheduler, "pub", "$JS.API.CONSUMER.DURABLE.CREATE." + outcomeStream + ".x"},
		{scheduler, "pub", "$JS.API.CONSUMER.CREATE." + deadStream + ".x." + deadSubject},
		{scheduler, "pub", "$JS.API.CONSUMER.CREATE." + stopStream + ".x." + stopSubject},
		{scheduler, "pub", "$JS.API.CONSUMER.MSG.NEXT." + deadStream + ".x"},
		{scheduler, "pub", "$JS.API.CONSUMER.DELETE." + stopStream + "." + consumerName},
		{scheduler, "pub", "$JS.API.CONSUMER.DELETE." + deadStream + ".x"},
		{scheduler, "pub", "$JS.ACK." + outcomeStream + ".x.1.1.1.1.0"},
		{scheduler, "pub", "$JS.API.STREAM.PURGE." + outcomeStream},
		{scheduler, "sub", deadSubject},
		{scheduler, "sub", stopSubject},
		{scheduler, "sub", "$KV." + stateBucket + ".>"},

		{auditor, "pub", stopSubject},
		{auditor, "pub", "$JS.API.CONSUMER.MSG.NEXT." + stopStream + "." + consumerName},
		{auditor, "pub", "$JS.API.CONSUMER.CREATE." + stopStream + ".spy"},
		{auditor, "pub", "$JS.API.CONSUMER.DELETE." + stopStream + "." + consumerName},
		{auditor, "pub", "$JS.API.STREAM.PURGE." + outcomeStream},
		{auditor, "pub", "$JS.API.STREAM.DELETE." + deadStream},
		{auditor, "pub", "$JS.API.STREAM.MSG.DELETE." + deadStream},
		{auditor, "pub", "$JS.API.DIRECT.GET.KV_" + stateBucket},
		{auditor, "pub", outcomePrefix + ".stopped"},
		{auditor, "sub", stopSubject},
	}
	for _, d := range denials {
		t.Run(fmt.Sprintf("%s may not %s %s", d.user.name, d.op, d.subject), func(t *testing.T) {
			d.user.denied(t, d.op, d.subject)
		})
	}

	// Nothing denied slipped through: the streams are all still there.
	ctx := stepCtx(t)
	for _, name := range []string{stopStream, outcomeStream, deadStream} {
		if _, err := worker.js.Stream(ctx, name); err != nil {
			t.Errorf("stream %s after the denials: %v", name, err)
		}
	}
	if _, err := worker.js.Consumer(ctx, stopStream, consumerName); err != nil {
		t.Errorf("consumer after the denials: %v", err)
	}
}
