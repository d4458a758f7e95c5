package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
)

// TestBadInputAtVolume pins "invalid input is rejected, dead-lettered
// unchanged and never reaches DLF, and it cannot take the worker down":
// 1,000 invalid stop commands (the command package's corpus, the fuzz
// corpus and the hand-written ones below) interleaved with 1,000 valid ones
// go through one worker process. Every invalid one must end rejected with a
// detail naming the field, with a byte-identical dead letter; every valid
// one must stop its instance with exactly one DLF call; the process must
// still run and the work queue must be empty at the end.
func TestBadInputAtVolume(t *testing.T) {
	const (
		n       = 1000
		project = "p"
		script  = "s"
		overall = 90 * time.Second
	)
	ctx, cancel := context.WithTimeout(context.Background(), overall)
	defer cancel()

	guard := newSecretsGuard(t, guardTokenCreds)
	srv := guard.server(t)
	nc, js := guard.connect(t, srv)
	emu, emuURL := emulator.StartForTest(t, guard.emulatorOption())

	// Room the NATS message needs beyond the body: the Nats-Msg-Id header
	// on the way in, the Dlf-* headers on the dead letter.
	maxBody := int(nc.MaxPayload()) - 8<<10
	defaults := command.Defaults{ProjectID: project}

	// The invalid bodies, each with the field the rejection must name.
	var pool []badCase
	var skipped []string
	add := func(src, field string, body []byte) {
		if len(body) > maxBody {
			skipped = append(skipped, fmt.Sprintf("%s (%d bytes: over NATS max payload)", src, len(body)))
			return
		}
		// The id Decode gives when the header is the one we publish with:
		// a body with a valid command_id of its own would make repeats of
		// it collide in the outcome stream's duplicate window.
		c, err := command.Decode(body, command.Meta{MsgID: "probe-id", Stream: "DLF_STOP", Seq: 1}, defaults)
		var ve *command.ValidationError
		switch {
		case err == nil:
			skipped = append(skipped, src+" (valid)")
			return
		case !errors.As(err, &ve):
			t.Errorf("%s: command.Decode returned %T %v, want *ValidationError", src, err, err)
			return
		case c.ID != "probe-id":
			skipped = append(skipped, src+" (carries its own command_id)")
			return
		}
		if field == "" {
			field = ve.Field
		} else if field != ve.Field {
			t.Errorf("%s: command.Decode blames %q (%v), the case expects %q", src, ve.Field, err, field)
		}
		pool = append(pool, badCase{src: src, field: field, body: body})
	}
	for i, b := range command.Corpus() {
		add(fmt.Sprintf("corpus[%d]", i), "", b)
	}
	fuzz, err := fuzzCorpusBodies(filepath.Join("..", "command", "testdata", "fuzz", "FuzzDecode"))
	if err != nil {
		t.Fatal(err)
	}
	if len(fuzz) == 0 {
		t.Fatal("no fuzz corpus inputs found")
	}
	names := make([]string, 0, len(fuzz))
	for name := range fuzz {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		add("fuzz/"+name, "", fuzz[name])
	}
	for _, c := range handWrittenBad(maxBody) {
		add("hand/"+c.src, c.field, c.body)
	}
	t.Logf("invalid bodies: %d distinct (%d skipped: %s)", len(pool), len(skipped), strings.Join(skipped, "; "))
	if len(pool) < 100 {
		t.Fatalf("only %d invalid bodies", len(pool))
	}

	// The commands: bad-NNNN cycles through the pool, good-NNNN stops
	// instance v-NNNN. Some valid bodies carry a 5,000-level nested unknown
	// field, some are exactly 64 KiB: both must be accepted.
	type sent struct {
		id, field, src string
		body           []byte
	}
	bad := make([]sent, n)
	good := make([]sent, n)
	for i := range n {
		c := pool[i%len(pool)]
		bad[i] = sent{id: fmt.Sprintf("bad-%04d", i), field: c.field, src: c.src, body: c.body}
		inst := fmt.Sprintf("v-%04d", i)
		emu.AddRunning(project, "", script, inst)
		body := []byte(`{"script_name":"` + script + `","instance_id":"` + inst + `"}`)
		switch i % 50 {
		case 7:
			body = []byte(`{"script_name":"` + script + `","x":` + strings.Repeat("[", 5000) +
				strings.Repeat("]", 5000) + `,"instance_id":"` + inst + `"}`)
		case 31:
			body = padBody(body, command.MaxBodySize)
		}
		if _, err := command.Decode(body, command.Meta{MsgID: "x", Stream: "DLF_STOP", Seq: 1}, defaults); err != nil {
			t.Fatalf("valid body %d rejected by command.Decode: %v", i, err)
		}
		good[i] = sent{id: fmt.Sprintf("good-%04d", i), body: body}
	}

	// Every publish, as the duplicate window would hide a repeat from the
	// stored count (found by review: a worker that published each outcome
	// twice passed).
	outcomePubs := countPublished(t, nc, "dlf.stop.outcome.*")
	w := startWorker(t, guard.workerEnv(map[string]string{
		"NATS_URL":                   srv.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": project,
		"HTTP_ADDR":                  anyPort,
	}))
	proc := newProcWatch(w)

	// The worker creates the streams; wait for them before reading.
	waitForStreams(ctx, t, js, proc)
	outs := collectStream(ctx, t, js, "DLF_STOP_OUTCOMES")
	deads := collectStream(ctx, t, js, "DLF_STOP_DEAD")

	start := time.Now()
	for i := range n {
		for _, s := range []sent{bad[i], good[i]} {
			if _, err := js.Publish(ctx, "dlf.stop.request", s.body, jetstream.WithMsgID(s.id)); err != nil {
				t.Fatalf("publish %s (%d bytes): %v", s.id, len(s.body), err)
			}
		}
	}
	published := time.Since(start)

	// Wait for every outcome and dead letter, then for the work queue to
	// be empty: a command decided but not acked would still be there.
	testutil.Eventually(t, 60*time.Second, func() error {
		if err := proc.check(); err != nil {
			return nil
		}
		if o, d := outs.len(), deads.len(); o < 2*n || d < n {
			return fmt.Errorf("%d of %d outcomes, %d of %d dead letters", o, 2*n, d, n)
		}
		return nil
	})
	testutil.Eventually(t, 30*time.Second, func() error {
		if err := proc.check(); err != nil {
			return nil
		}
		if m := streamMsgs(ctx, t, js, "DLF_STOP"); m != 0 {
			return fmt.Errorf("%d commands still in DLF_STOP", m)
		}
		return nil
	})
	elapsed := time.Since(start)
	crashErr := proc.check()

	// What the consumer delivered beyond one delivery per command.
	var redeliveries int64 = -1
	if cons, err := js.Consumer(ctx, "DLF_STOP", "dlf-stop-worker"); err != nil {
		t.Errorf("look up consumer: %v", err)
	} else if ci, err := cons.Info(ctx); err != nil {
		t.Errorf("consumer info: %v", err)
	} else {
		redeliveries = int64(ci.Delivered.Consumer) - 2*n
	}
	// Read both streams to their end: nothing may come after the counts.
	wantOut, wantDead := readCollectedToEnd(ctx, t, js, outs, deads)

	outByID := map[string][]badOutcome{}
	for _, m := range outs.all() {
		var o badOutcome
		if err := json.Unmarshal(m.data, &o); err != nil {
			t.Errorf("outcome on %s is not JSON: %v: %q", m.subject, err, m.data)
			continue
		}
		if got := m.header.Get(jetstream.MsgIDHeader); got != o.CommandID {
			t.Errorf("outcome %s has Nats-Msg-Id %q", o.CommandID, got)
		}
		outByID[o.CommandID] = append(outByID[o.CommandID], o)
	}
	deadByID := map[string][]streamMsg{}
	for _, m := range deads.all() {
		id := m.header.Get(jetstream.MsgIDHeader)
		deadByID[id] = append(deadByID[id], m)
	}

	var rejected, deadLetters, identical, stopped int
	var problems []string
	problem := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	for _, s := range bad {
		got := outByID[s.id]
		switch {
		case len(got) != 1:
			problem("%s (%s): %d outcomes", s.id, s.src, len(got))
		case got[0].Status != consumer.StatusRejected || got[0].Cause != consumer.CauseInvalidCommand:
			problem("%s (%s): outcome %s/%s %q", s.id, s.src, got[0].Status, got[0].Cause, got[0].Detail)
		case !strings.HasPrefix(got[0].Detail, s.field+":"):
			problem("%s (%s): detail %q does not start with %q", s.id, s.src, got[0].Detail, s.field+":")
		case got[0].Attempts != 0 || got[0].HTTPStatus != 0:
			problem("%s (%s): rejected with attempts=%d http_status=%d", s.id, s.src, got[0].Attempts, got[0].HTTPStatus)
		default:
			rejected++
		}
		ds := deadByID[s.id]
		if len(ds) != 1 {
			problem("%s (%s): %d dead letters", s.id, s.src, len(ds))
			continue
		}
		deadLetters++
		d := ds[0]
		if bytes.Equal(d.data, s.body) {
			identical++
		} else {
			problem("%s (%s): dead letter body differs: %d bytes, published %d", s.id, s.src, len(d.data), len(s.body))
		}
		if st, c := d.header.Get(consumer.HeaderStatus), d.header.Get(consumer.HeaderCause); st != consumer.StatusRejected || c != consumer.CauseInvalidCommand {
			problem("%s (%s): dead letter headers %s/%s", s.id, s.src, st, c)
		}
	}
	for i, s := range good {
		got := outByID[s.id]
		switch {
		case len(got) != 1:
			problem("%s: %d outcomes", s.id, len(got))
		case got[0].Status != consumer.StatusStopped:
			problem("%s: outcome %s/%s %q", s.id, got[0].Status, got[0].Cause, got[0].Detail)
		default:
			stopped++
		}
		if len(deadByID[s.id]) != 0 {
			problem("%s: %d dead letters for a valid command", s.id, len(deadByID[s.id]))
		}
		if n := emu.StopCallsFor(project, script, fmt.Sprintf("v-%04d", i)); n != 1 {
			problem("%s: %d DLF calls for its instance", s.id, n)
		}
	}
	if extra := len(outByID) - 2*n; extra != 0 {
		problem("%d outcome ids beyond the published commands", extra)
	}
	if extra := len(deadByID) - n; extra != 0 {
		problem("%d dead-letter ids beyond the invalid commands", extra)
	}

	// A panic the worker recovered from is a crash too, only a quieter one.
	crashes := 0
	if crashErr != nil {
		crashes++
	}
	var panics []string
	for _, l := range w.lines() {
		if strings.Contains(l, "panic") {
			panics = append(panics, l)
		}
	}
	crashes += len(panics)
	calls := emu.StopCalls()

	t.Logf("bad_input invalid=%d rejected=%d dead_letters=%d byte_identical=%d valid=%d stopped=%d dlf_calls=%d crashes=%d",
		n, rejected, deadLetters, identical, n, stopped, calls, crashes)
	t.Logf("bad_input detail: published in %s, all decided and acked in %s, redeliveries=%d, outcome_msgs=%d, dead_msgs=%d",
		published.Round(time.Millisecond), elapsed.Round(time.Millisecond), redeliveries, wantOut, wantDead)

	if crashErr != nil {
		t.Errorf("worker exited: %v; log: %s", crashErr, tail(w.lines(), 10))
	}
	if len(panics) > 0 {
		t.Errorf("worker logged %d panics, e.g. %s", len(panics), sample(panics))
	}
	if len(problems) > 0 {
		t.Errorf("%d problems, e.g.:\n%s", len(problems), strings.Join(problems[:min(len(problems), 15)], "\n"))
	}
	if calls != n {
		t.Errorf("DLF stop calls: %d, want %d (one per valid command, none for invalid input)", calls, n)
	}
	if r := outcomePubs.republished(); r != 0 {
		t.Errorf("%d outcome publishes beyond one per command, without a fault to explain them", r)
	}
	if redeliveries != 0 {
		t.Errorf("consumer delivered %d times beyond one per command", redeliveries)
	}
	if crashErr == nil {
		if err := terminate(w, 30*time.Second); err != nil {
			t.Errorf("SIGTERM: %v; log: %s", err, tail(w.lines(), 10))
		}
	}
	guard.check(t, js, "bad_input", [][]string{w.lines()})
}

// badCase is one invalid body and the field its rejection must name.
type badCase struct {
	src, field string
	body       []byte
}

// badOutcome is the part of an outcome event this file looks at.
type badOutcome struct {
	CommandID  string `json:"command_id"`
	Status     string `json:"status"`
	Cause      string `json:"cause"`
	Detail     string `json:"detail"`
	HTTPStatus int    `json:"http_status"`
	Attempts   int    `json:"attempts"`
}

// handWrittenBad returns invalid bodies beyond the command package's
// corpus, each with the field to blame when the worker's project default
// is set. None carries a valid command_id.
func handWrittenBad(maxBody int) []badCase {
	rep := strings.Repeat
	obj := func(members string) []byte { return []byte("{" + members + "}") }
	const si = `"script_name":"job","instance_id":"i-1"`
	return []badCase{
		// Wrong types.
		{"instance_id bool", "instance_id", obj(`"script_name":"job","instance_id":true`)},
		{"instance_id array", "instance_id", obj(`"script_name":"job","instance_id":["i-1"]`)},
		{"project_id number", "project_id", obj(`"project_id":7,` + si)},
		{"workspace object", "workspace", obj(`"workspace":{},` + si)},
		{"deadline object", "deadline", obj(si + `,"deadline":{"at":"2030-01-01T00:00:00Z"}`)},
		{"reason array", "reason", obj(si + `,"reason":["a"]`)},
		{"command_id bool", "command_id", obj(`"command_id":false,` + si)},
		{"script_name float", "script_name", obj(`"script_name":1.5e3,"instance_id":"i-1"`)},

		// null for required fields.
		{"script_name null", "script_name", obj(`"script_name":null,"instance_id":"i-1"`)},
		{"instance_id null", "instance_id", obj(`"script_name":"job","instance_id":null`)},
		{"both null", "script_name", obj(`"script_name":null,"instance_id":null`)},
		{"empty object", "script_name", obj(``)},

		// Deep nesting.
		{"5000 levels in unknown field, no instance_id", "instance_id",
			obj(`"script_name":"job","x":` + rep("[", 5000) + rep("]", 5000))},
		{"5000 objects in unknown field, script_name ..", "script_name",
			obj(`"instance_id":"i-1","x":` + rep(`{"a":`, 5000) + `1` + rep("}", 5000) + `,"script_name":".."`)},
		{"20000 levels in unknown field", "body", obj(si + `,"x":` + rep("[", 20000) + rep("]", 20000))},
		{"20000 levels top level", "body", []byte(rep("[", 20000) + rep("]", 20000))},
		{"20000 objects (over 64 KiB too)", "body", []byte(rep(`{"a":`, 20000) + `1` + rep("}", 20000))},
		{"12000 unclosed objects", "body", []byte(rep(`{"a":`, 12000))},

		// Invalid UTF-8 and NUL bytes.
		{"invalid UTF-8 in reason", "body", obj(si + `,"reason":"` + "\xff\xfe" + `"`)},
		{"invalid UTF-8 in unknown value", "body", obj(si + `,"x":"` + "\x80" + `"`)},
		{"lone continuation byte outside strings", "body", []byte(`{` + si + "}\x80")},
		{"raw NUL in instance_id", "body", obj(`"script_name":"job","instance_id":"i` + "\x00" + `1"`)},
		{"escaped NUL in instance_id", "instance_id", obj(`"script_name":"job","instance_id":"i\u00001"`)},
		{"NUL after object", "body", append(obj(si), 0)},
		{"only NULs", "body", []byte{0, 0, 0, 0}},

		// Over 64 KiB.
		{"64 KiB + 1 valid fields", "body", padBody(obj(si), command.MaxBodySize+1)},
		{"256 KiB", "body", padBody(obj(si), 256<<10)},
		{"near max payload", "body", padBody(obj(si), maxBody)},

		// Path tricks.
		{"instance_id ..", "instance_id", obj(`"script_name":"job","instance_id":".."`)},
		{"script_name a/../b", "script_name", obj(`"script_name":"a/../b","instance_id":"i-1"`)},
		{"script_name escaped slash", "script_name", obj(`"script_name":"..\/..","instance_id":"i-1"`)},
		{"instance_id %2F", "instance_id", obj(`"script_name":"job","instance_id":"a%2Fb"`)},
		{"workspace %2F", "workspace", obj(`"workspace":"%2F",` + si)},
		{"project_id %2e%2e", "project_id", obj(`"project_id":"%2e%2e",` + si)},

		// 10 KB names.
		{"instance_id 10 KB", "instance_id", obj(`"script_name":"job","instance_id":"` + rep("i", 10<<10) + `"`)},
		{"project_id 10 KB", "project_id", obj(`"project_id":"` + rep("p", 10<<10) + `",` + si)},
		{"workspace 10 KB", "workspace", obj(`"workspace":"` + rep("w", 10<<10) + `",` + si)},
		{"command_id 10 KB", "command_id", obj(`"command_id":"` + rep("c", 10<<10) + `",` + si)},
		{"script_name 10 KB of é", "script_name", obj(`"script_name":"` + rep("é", 5<<10) + `","instance_id":"i-1"`)},

		// Other rules.
		{"deadline February 30", "deadline", obj(si + `,"deadline":"2030-02-30T00:00:00Z"`)},
		{"reason 1025 bytes", "reason", obj(si + `,"reason":"` + rep("r", 1025) + `"`)},
		{"duplicate instance_id", "instance_id", obj(si + `,"instance_id":"i-2"`)},
	}
}

// padBody grows a JSON object (ending in '}') with a "pad" member so the
// body is exactly size bytes.
func padBody(obj []byte, size int) []byte {
	head := append([]byte(nil), obj[:len(obj)-1]...)
	if len(head) > 1 {
		head = append(head, ',')
	}
	head = append(head, `"pad":"`...)
	if fill := size - len(head) - 2; fill > 0 {
		head = append(head, bytes.Repeat([]byte("x"), fill)...)
	}
	return append(head, '"', '}')
}

// fuzzCorpusBodies reads the body argument (the first []byte line) of each
// file in a `go test fuzz v1` corpus directory.
func fuzzCorpusBodies(dir string) (map[string][]byte, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
		if !sc.Scan() || strings.TrimSpace(sc.Text()) != "go test fuzz v1" {
			return nil, fmt.Errorf("%s: not a go test fuzz v1 file", e.Name())
		}
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			lit, ok := strings.CutPrefix(line, "[]byte(")
			if !ok {
				continue
			}
			lit, ok = strings.CutSuffix(lit, ")")
			if !ok {
				return nil, fmt.Errorf("%s: malformed line %q", e.Name(), line)
			}
			s, err := strconv.Unquote(lit)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", e.Name(), err)
			}
			out[e.Name()] = []byte(s)
			break
		}
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("%s: %w", e.Name(), err)
		}
	}
	return out, nil
}

// streamMsg is a copy of one stored message.
type streamMsg struct {
	subject string
	header  nats.Header
	data    []byte
}

// streamCollector keeps every message an ordered consumer reads.
type streamCollector struct {
	mu   sync.Mutex
	msgs []streamMsg
}

func collectStream(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) *streamCollector {
	t.Helper()
	c := &streamCollector{}
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", stream, err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		h := nats.Header{}
		for k, v := range m.Headers() {
			h[k] = append([]string(nil), v...)
		}
		sm := streamMsg{subject: m.Subject(), header: h, data: append([]byte(nil), m.Data()...)}
		c.mu.Lock()
		c.msgs = append(c.msgs, sm)
		c.mu.Unlock()
	})
	if err != nil {
		t.Fatalf("consume %s: %v", stream, err)
	}
	t.Cleanup(cc.Stop)
	return c
}

// readCollectedToEnd waits until outs and deads hold every message the
// outcome and dead-letter streams hold now, and returns those counts.
func readCollectedToEnd(ctx context.Context, t *testing.T, js jetstream.JetStream, outs, deads *streamCollector) (wantOut, wantDead uint64) {
	t.Helper()
	wantOut, wantDead = streamMsgs(ctx, t, js, "DLF_STOP_OUTCOMES"), streamMsgs(ctx, t, js, "DLF_STOP_DEAD")
	testutil.Eventually(t, 10*time.Second, func() error {
		if o, d := uint64(outs.len()), uint64(deads.len()); o != wantOut || d != wantDead {
			return fmt.Errorf("read %d of %d outcomes, %d of %d dead letters", o, wantOut, d, wantDead)
		}
		return nil
	})
	return wantOut, wantDead
}

func (c *streamCollector) len() int { c.mu.Lock(); defer c.mu.Unlock(); return len(c.msgs) }

func (c *streamCollector) all() []streamMsg {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]streamMsg(nil), c.msgs...)
}

// procWatch notices, without blocking, that a worker process has exited.
type procWatch struct {
	c      *child
	exited bool
	err    error
}

func newProcWatch(c *child) *procWatch { return &procWatch{c: c} }

// check returns an error once the process has exited.
func (p *procWatch) check() error {
	if !p.exited {
		select {
		case err := <-p.c.done:
			p.exited, p.err = true, err
			p.c.done <- err // leave it for terminate and others
		default:
			return nil
		}
	}
	return fmt.Errorf("worker process exited: %v", p.err)
}

// waitForStreams waits until the worker has created its streams, and fails
// the test if the process exited first.
func waitForStreams(ctx context.Context, t *testing.T, js jetstream.JetStream, proc *procWatch) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, func() error {
		if err := proc.check(); err != nil {
			return nil // reported below
		}
		for _, s := range []string{"DLF_STOP", "DLF_STOP_OUTCOMES", "DLF_STOP_DEAD"} {
			if _, err := js.Stream(ctx, s); err != nil {
				return fmt.Errorf("stream %s: %w", s, err)
			}
		}
		return nil
	})
	if err := proc.check(); err != nil {
		t.Fatalf("worker did not start: %v; log: %s", err, tail(proc.c.lines(), 10))
	}
}

// terminate sends SIGTERM and waits for a clean exit (status 0) after
// which every log line has been read.
func terminate(c *child, within time.Duration) error {
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal: %w", err)
	}
	select {
	case err := <-c.done:
		c.done <- err
		if err != nil {
			return fmt.Errorf("exit after SIGTERM: %w", err)
		}
		return nil
	case <-time.After(within):
		return fmt.Errorf("still running %s after SIGTERM", within)
	}
}
