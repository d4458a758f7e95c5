package emulator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/testutil"
)

func TestFaultLatency(t *testing.T) {
	e, base := StartForTest(t)
	c := newClient(t)
	const d = 150 * time.Millisecond
	e.SetFaults(Faults{Latency: d})
	id := e.Execute("p", "", "s")
	start := time.Now()
	a := mustSend(t, c, http.MethodPost, base+stopPath("p", "s", id), nil)
	if took := time.Since(start); took < d {
		t.Fatalf("answered after %s, latency %s", took, d)
	}
	wantStatus(t, a, http.StatusNoContent)

	// Execute and query are not slowed down.
	start = time.Now()
	mustSend(t, c, http.MethodGet, base+queryPath("p", "s", id), nil)
	if took := time.Since(start); took >= d {
		t.Fatalf("query took %s", took)
	}
}

// A client that gives up during Latency gets no answer, but the stop is
// applied when the latency ends: "sent, no answer, stopped".
func TestFaultLatencyClientGivesUp(t *testing.T) {
	e, base := StartForTest(t)
	e.SetFaults(Faults{Latency: 300 * time.Millisecond})
	id := e.Execute("p", "", "s")
	c := newClient(t)
	c.Timeout = 50 * time.Millisecond
	if _, err := send(c, http.MethodPost, base+stopPath("p", "s", id), nil); err == nil {
		t.Fatal("answer within the client timeout")
	}
	if e.Stopped("p", "s", id) {
		t.Fatal("stopped before the latency ended")
	}
	testutil.WaitFor(t, 5*time.Second, "the stop to be applied", func() bool { return e.Stopped("p", "s", id) })
	testutil.WaitFor(t, 5*time.Second, "the request to be recorded", func() bool { return len(e.Requests()) == 1 })
	if r := e.Requests()[0]; !r.Applied {
		t.Fatalf("recorded %+v", r)
	}
}

func TestFaultErrorRate(t *testing.T) {
	const calls, rate = 1000, 0.25
	run := func(seed uint64, status int) []int {
		e, base := StartForTest(t, WithSeed(seed))
		e.SetFaults(Faults{ErrorRate: rate, ErrorStatus: status})
		c := newClient(t)
		out := make([]int, calls)
		for i := range out {
			a := mustSend(t, c, http.MethodPost, base+stopPath("p", "s", "unknown"), nil)
			out[i] = a.status
			if a.status != http.StatusBadRequest {
				if want := fmt.Sprint(CodeFaultPrefix, a.status); a.errorCode(t) != want {
					t.Fatalf("injected error body %s", a.body)
				}
			}
		}
		return out
	}
	first := run(7, 0)
	failed := 0
	for _, s := range first {
		switch s {
		case http.StatusServiceUnavailable:
			failed++
		case http.StatusBadRequest:
		default:
			t.Fatalf("status %d", s)
		}
	}
	// Binomial(1000, 0.25): sd ~ 13.7; allow 5 sd.
	if share := float64(failed) / calls; math.Abs(share-rate) > 0.07 {
		t.Fatalf("%d of %d failed, rate %v", failed, calls, rate)
	}
	second := run(7, http.StatusInternalServerError)
	for i := range first {
		if (first[i] == http.StatusServiceUnavailable) != (second[i] == http.StatusInternalServerError) {
			t.Fatalf("same seed, different sequence at call %d", i)
		}
	}
}

func TestFaultErrorRateDoesNotStop(t *testing.T) {
	e, base := StartForTest(t)
	e.SetFaults(Faults{ErrorRate: 1, ErrorStatus: 599 + 1}) // out of range: 503
	if got := e.Faults().ErrorStatus; got != http.StatusServiceUnavailable {
		t.Fatalf("ErrorStatus normalised to %d", got)
	}
	id := e.Execute("p", "", "s")
	wantStatus(t, mustSend(t, newClient(t), http.MethodPost, base+stopPath("p", "s", id), nil), http.StatusServiceUnavailable)
	if st, _ := e.Status("p", "s", id); st != StatusRunning {
		t.Fatalf("status %s after an injected error", st)
	}
}

func TestFaultThrottle(t *testing.T) {
	e, base := StartForTest(t)
	c := newClient(t)
	for _, tc := range []struct {
		retryAfter time.Duration
		want       string
	}{
		{2500 * time.Millisecond, "3"},
		{4 * time.Second, "4"},
		{0, "1"},
		{-1, ""},
	} {
		t.Run(fmt.Sprint(tc.retryAfter), func(t *testing.T) {
			e.SetFaults(Faults{Throttle: true, RetryAfter: tc.retryAfter})
			id := e.Execute("p", "", "s")
			a := mustSend(t, c, http.MethodPost, base+stopPath("p", "s", id), nil)
			wantStatus(t, a, http.StatusTooManyRequests)
			if code := a.errorCode(t); code != CodeThrottled {
				t.Fatalf("code %q", code)
			}
			if got, ok := a.header[HeaderRetryAfter]; tc.want == "" && ok || tc.want != "" && (len(got) != 1 || got[0] != tc.want) {
				t.Fatalf("Retry-After %q, want %q", got, tc.want)
			}
			if e.Stopped("p", "s", id) {
				t.Fatal("throttled request stopped the instance")
			}
		})
	}
}

func TestFaultHangReleasedByClient(t *testing.T) {
	e, base := StartForTest(t)
	e.SetFaults(Faults{Hang: true})
	id := e.Execute("p", "", "s")
	c := newClient(t)
	c.Timeout = 200 * time.Millisecond
	start := time.Now()
	_, err := send(c, http.MethodPost, base+stopPath("p", "s", id), nil)
	if err == nil {
		t.Fatal("a hanging request was answered")
	}
	if took := time.Since(start); took < c.Timeout {
		t.Fatalf("gave up after %s", took)
	}
	// The handler ends once the client is gone: the request is recorded.
	testutil.WaitFor(t, 5*time.Second, "the hanging handler to end", func() bool { return len(e.Requests()) == 1 })
	r := e.Requests()[0]
	if r.Fault != "hang" || r.Status != 0 || r.Applied {
		t.Fatalf("recorded %+v", r)
	}
	if st, _ := e.Status("p", "s", id); st != StatusRunning {
		t.Fatalf("status %s after a hang", st)
	}
	// Clearing the fault answers again.
	e.SetFaults(Faults{})
	wantStatus(t, mustSend(t, newClient(t), http.MethodPost, base+stopPath("p", "s", id), nil), http.StatusNoContent)
}

func TestFaultHangReleasedByClose(t *testing.T) {
	e := New()
	base, err := e.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	e.SetFaults(Faults{Hang: true})
	c := newClient(t)
	c.Timeout = 0 // only Close can end it
	got := make(chan error, 1)
	go func() {
		_, err := send(c, http.MethodPost, base+stopPath("p", "s", "i"), nil)
		got <- err
	}()
	testutil.WaitFor(t, 5*time.Second, "the request to arrive", func() bool { return e.StopCalls() == 1 })
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	// Close returns after every handler ended, so the request is recorded.
	if reqs := e.Requests(); len(reqs) != 1 || reqs[0].Fault != "hang" || reqs[0].Status != 0 {
		t.Fatalf("after Close: %+v", reqs)
	}
	select {
	case err := <-got:
		if err == nil {
			t.Fatal("answered")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not release the hanging request")
	}
}

func TestFaultAuthFail(t *testing.T) {
	e, base := StartForTest(t, WithAuthToken("tok"))
	e.SetFaults(Faults{AuthFail: true})
	c := newClient(t)
	id := e.Execute("p", "", "s")
	ok := map[string]string{HeaderAuthToken: "tok"}
	for _, tc := range []struct{ method, path string }{
		{http.MethodPost, executePath("p", "s")},
		{http.MethodGet, queryPath("p", "s", id)},
		{http.MethodPost, stopPath("p", "s", id)},
	} {
		a := mustSend(t, c, tc.method, base+tc.path, ok)
		wantStatus(t, a, http.StatusUnauthorized)
		if code := a.errorCode(t); code != CodeAuth {
			t.Fatalf("%s: code %q", tc.path, code)
		}
	}
	if e.Stopped("p", "s", id) {
		t.Fatal("stopped under AuthFail")
	}
	e.SetFaults(Faults{})
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", id), ok), http.StatusNoContent)
}

func TestFaultDropAfterStop(t *testing.T) {
	e, base := StartForTest(t)
	e.SetFaults(Faults{DropAfterStop: true})
	id := e.Execute("p", "", "s")
	_, err := send(newClient(t), http.MethodPost, base+stopPath("p", "s", id), nil)
	if err == nil {
		t.Fatal("got an answer")
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("error %v, want EOF or connection reset", err)
	}
	if !e.Stopped("p", "s", id) {
		t.Fatal("instance not stopped")
	}
	testutil.WaitFor(t, 5*time.Second, "the request to be recorded", func() bool { return len(e.Requests()) == 1 })
	if r := e.Requests()[0]; r.Fault != "drop" || r.Status != 0 || !r.Applied {
		t.Fatalf("recorded %+v", r)
	}
	// The retry that follows a lost 204 meets DLF.6205.
	e.SetFaults(Faults{})
	a := mustSend(t, newClient(t), http.MethodPost, base+stopPath("p", "s", id), nil)
	wantStatus(t, a, http.StatusBadRequest)
	if e.StopCallsFor("p", "s", id) != 2 {
		t.Fatalf("StopCallsFor = %d", e.StopCallsFor("p", "s", id))
	}
}

func TestFaultDown(t *testing.T) {
	e, base := StartForTest(t)
	addr := strings.TrimPrefix(base, "http://")
	c := newClient(t)
	id := e.Execute("p", "", "s")
	// Leave a keep-alive connection in the client's pool.
	wantStatus(t, mustSend(t, c, http.MethodGet, base+queryPath("p", "s", id), nil), http.StatusOK)

	// And a raw open connection, to see the server close it.
	raw, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	testutil.WaitFor(t, 5*time.Second, "the raw connection to be tracked", func() bool {
		e.connMu.Lock()
		defer e.connMu.Unlock()
		return len(e.conns) >= 2
	})

	e.SetFaults(Faults{Down: true})
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := raw.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("open connection not closed by Down: read %d, %v", n, err)
	}
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		conn.Close()
		t.Fatal("connection accepted while Down")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial: %v, want connection refused", err)
	}
	if _, err := send(c, http.MethodPost, base+stopPath("p", "s", id), nil); err == nil {
		t.Fatal("request answered while Down (the pooled connection must be gone too)")
	}
	if e.Stopped("p", "s", id) {
		t.Fatal("stopped while Down")
	}
	if e.URL() != base {
		t.Fatalf("URL %q while down", e.URL())
	}

	e.SetFaults(Faults{})
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", id), nil), http.StatusNoContent)

	// Down and up again, several times.
	for range 3 {
		e.SetFaults(Faults{Down: true})
		if _, err := send(c, http.MethodGet, base+queryPath("p", "s", id), nil); err == nil {
			t.Fatal("answered while Down")
		}
		e.SetFaults(Faults{})
		wantStatus(t, mustSend(t, c, http.MethodGet, base+queryPath("p", "s", id), nil), http.StatusOK)
	}
}

func TestFaultDownBeforeStart(t *testing.T) {
	e := New()
	e.SetFaults(Faults{Down: true})
	base, err := e.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	c := newClient(t)
	if _, err := send(c, http.MethodGet, base+queryPath("p", "s", "i"), nil); err == nil {
		t.Fatal("answered while Down")
	}
	e.SetFaults(Faults{})
	wantStatus(t, mustSend(t, c, http.MethodGet, base+queryPath("p", "s", "i"), nil), http.StatusBadRequest)
}

func TestPerInstanceFaults(t *testing.T) {
	e, base := StartForTest(t)
	c := newClient(t)

	t.Run("one hanging instance does not block others", func(t *testing.T) {
		slow := e.Execute("p", "", "s")
		fast := e.Execute("p", "", "s")
		e.SetFaultsFor("p", "s", slow, Faults{Hang: true})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		hung := make(chan error, 1)
		go func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+stopPath("p", "s", slow), nil)
			_, err := do(c, req)
			hung <- err
		}()
		testutil.WaitFor(t, 5*time.Second, "the slow request to arrive", func() bool { return e.StopCallsFor("p", "s", slow) == 1 })
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", fast), nil), http.StatusNoContent)
		select {
		case err := <-hung:
			t.Fatalf("slow request ended early: %v", err)
		default:
		}
		cancel()
		if err := <-hung; err == nil {
			t.Fatal("hanging request answered")
		}
		if e.Stopped("p", "s", slow) {
			t.Fatal("hanging instance stopped")
		}
	})

	t.Run("override wins over global faults", func(t *testing.T) {
		e.SetFaults(Faults{Throttle: true})
		defer e.SetFaults(Faults{})
		free := e.Execute("p", "", "s")
		other := e.Execute("p", "", "s")
		e.SetFaultsFor("p", "s", free, Faults{})
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", free), nil), http.StatusNoContent)
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", other), nil), http.StatusTooManyRequests)
		e.AddRunning("p", "", "s", free)
		e.ClearFaultsFor("p", "s", free)
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", free), nil), http.StatusTooManyRequests)
	})

	t.Run("errors for one instance only", func(t *testing.T) {
		bad := e.Execute("p", "", "s")
		good := e.Execute("p", "", "s")
		e.SetFaultsFor("p", "s", bad, Faults{ErrorRate: 1, ErrorStatus: http.StatusInternalServerError})
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", bad), nil), http.StatusInternalServerError)
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", good), nil), http.StatusNoContent)
	})

	t.Run("latency for one instance only", func(t *testing.T) {
		slow := e.Execute("p", "", "s")
		e.SetFaultsFor("p", "s", slow, Faults{Latency: 100 * time.Millisecond})
		start := time.Now()
		wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("p", "s", slow), nil), http.StatusNoContent)
		if took := time.Since(start); took < 100*time.Millisecond {
			t.Fatalf("took %s", took)
		}
	})

	t.Run("per-instance down closes that connection only", func(t *testing.T) {
		gone := e.Execute("p", "", "s")
		e.SetFaultsFor("p", "s", gone, Faults{Down: true})
		if _, err := send(c, http.MethodPost, base+stopPath("p", "s", gone), nil); err == nil {
			t.Fatal("answered")
		}
		if e.Stopped("p", "s", gone) {
			t.Fatal("stopped")
		}
		wantStatus(t, mustSend(t, c, http.MethodGet, base+queryPath("p", "s", gone), nil), http.StatusOK)
	})

	t.Run("drop for one instance only, set before it exists", func(t *testing.T) {
		e.SetFaultsFor("p", "s", "future", Faults{DropAfterStop: true})
		if _, ok := e.Status("p", "s", "future"); ok {
			t.Fatal("a fault override created an instance")
		}
		e.AddRunning("p", "", "s", "future")
		if _, err := send(c, http.MethodPost, base+stopPath("p", "s", "future"), nil); err == nil {
			t.Fatal("answered")
		}
		if !e.Stopped("p", "s", "future") {
			t.Fatal("not stopped")
		}
	})
}

func TestFaultsNormalize(t *testing.T) {
	for _, tc := range []struct {
		in, want Faults
	}{
		{Faults{}, Faults{ErrorStatus: 503}},
		{Faults{ErrorRate: -1, ErrorStatus: 500}, Faults{ErrorStatus: 500}},
		{Faults{ErrorRate: 2, ErrorStatus: 200}, Faults{ErrorRate: 1, ErrorStatus: 503}},
		{Faults{ErrorRate: math.NaN(), Latency: -time.Second}, Faults{ErrorStatus: 503}},
		{Faults{ErrorStatus: 403}, Faults{ErrorStatus: 403}},
	} {
		if got := tc.in.normalize(); got != tc.want {
			t.Errorf("normalize(%+v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
