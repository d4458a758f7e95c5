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
