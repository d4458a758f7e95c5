package testutil

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// recorder is a testing.TB that records a failure instead of ending the
// test, so the helpers' own failures can be checked.
type recorder struct {
	testing.TB
	mu     sync.Mutex
	failed string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatal(args ...any) { r.Fatalf("%s", fmt.Sprint(args...)) }

func (r *recorder) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.failed = fmt.Sprintf(format, args...)
	r.mu.Unlock()
	// Like testing's FailNow, end the helper's goroutine.
	panic(errStop)
}

var errStop = errors.New("stopped by Fatal")

func run(r *recorder, f func()) {
	defer func() {
		if p := recover(); p != nil && p != errStop {
			panic(p)
		}
	}()
	f()
}

func TestEventually(t *testing.T) {
	n := 0
	r := &recorder{TB: t}
	run(r, func() {
		Eventually(r, time.Second, func() error {
			if n++; n < 3 {
				return errors.New("not yet")
			}
			return nil
		})
	})
	if r.failed != "" || n != 3 {
		t.Fatalf("met after %d polls, failure %q", n, r.failed)
	}

	r = &recorder{TB: t}
	start := time.Now()
	run(r, func() { Eventually(r, 50*time.Millisecond, func() error { return errors.New("never") }) })
	if !strings.Contains(r.failed, "never") || time.Since(start) < 50*time.Millisecond {
		t.Fatalf("failure %q after %s", r.failed, time.Since(start))
	}
}

func TestConsistently(t *testing.T) {
	r := &recorder{TB: t}
	n := 0
	run(r, func() { Consistently(r, 50*time.Millisecond, func() error { n++; return nil }) })
	if r.failed != "" || n < 2 {
		t.Fatalf("%d polls, failure %q", n, r.failed)
	}
	r = &recorder{TB: t}
	n = 0
	run(r, func() {
		Consistently(r, time.Second, func() error {
			if n++; n == 2 {
				return errors.New("broke")
			}
			return nil
		})
	})
	if !strings.Contains(r.failed, "broke") || n != 2 {
		t.Fatalf("%d polls, failure %q", n, r.failed)
	}
}

func TestSyncBuffer(t *testing.T) {
	var b SyncBuffer
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fmt.Fprint(&b, "x")
			_ = b.String()
		}()
	}
	wg.Wait()
	if b.String() != strings.Repeat("x", 10) {
		t.Fatalf("buffer = %q", b.String())
	}
}

func TestStartNATS(t *testing.T) {
	ns := StartNATS(t)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if !ns.JetStreamEnabled() {
		t.Fatal("JetStream is off")
	}
}

func TestParseDevBanner(t *testing.T) {
	text := `dlf-stop worker dev environment is running. Ctrl-C stops it.

NATS URL:      nats://127.0.0.1:4222
HTTP address:  http://127.0.0.1:8080  (/metrics /healthz /readyz)

Running instances ready to stop:
  i-1
  i-2

Publish a stop command with the nats CLI:
  nats --server nats://127.0.0.1:4222 pub dlf.stop.request '{"script_name":"s","instance_id":"i-1"}'

Or with this binary (prints the outcome):
  NATS_URL=nats://127.0.0.1:4222 /bin/worker stop --script s --instance i-2
`
	b, err := ParseDevBanner(text)
	if err != nil {
		t.Fatal(err)
	}
	want := DevBanner{NATSURL: "nats://127.0.0.1:4222", HTTPAddr: "127.0.0.1:8080", Instances: []string{"i-1", "i-2"},
		PubJSON: `{"script_name":"s","instance_id":"i-1"}`, StopLine: "NATS_URL=nats://127.0.0.1:4222 /bin/worker stop --script s --instance i-2",
		StopEnv: "nats://127.0.0.1:4222", StopArgs: []string{"--script", "s", "--instance", "i-2"}}
	if fmt.Sprint(b) != fmt.Sprint(want) {
		t.Fatalf("parsed\n%+v\nwant\n%+v", b, want)
	}
	if _, err := ParseDevBanner("NATS URL: nats://x:1\n"); err == nil {
		t.Fatal("an incomplete banner parsed without error")
	}
}

func TestWatcher(t *testing.T) {
	ns := StartNATS(t)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	type ev struct{ N int }
	w := Watch[ev](t, nc, "ev.*")
	var checked []string
	w.Check = func(_ testing.TB, subject string, _ ev) { checked = append(checked, subject) }
	for i := 1; i <= 3; i++ {
		if err := nc.Publish(fmt.Sprintf("ev.%d", i), []byte(fmt.Sprintf(`{"N":%d}`, i))); err != nil {
			t.Fatal(err)
		}
	}
	if got := w.Wait(t, 5*time.Second, func(e ev) bool { return e.N == 2 }); got.N != 2 {
		t.Fatalf("got %+v", got)
	}
	// The first message was read on the way and is still found.
	if got := w.Wait(t, time.Second, func(e ev) bool { return e.N == 1 }); got.N != 1 {
		t.Fatalf("got %+v", got)
	}
	if len(checked) != 2 || checked[0] != "ev.1" {
		t.Fatalf("checked %v", checked)
	}

	r := &recorder{TB: t}
	run(r, func() { w.Wait(r, 50*time.Millisecond, func(e ev) bool { return e.N == 9 }) })
	if !strings.Contains(r.failed, "no matching message") {
		t.Fatalf("failure %q", r.failed)
	}
}
