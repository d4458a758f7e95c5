package opshttp

import (
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestReadiness(t *testing.T) {
	workerReady := func() (bool, string) { return true, "" }
	workerNot := func() (bool, string) { return false, "NATS not connected" }
	tests := []struct {
		name   string
		steps  func(r *Readiness)
		ok     bool
		reason string
	}{
		{"first step", func(*Readiness) {}, false, "starting: connecting to NATS"},
		{"next step", func(r *Readiness) { r.Starting("setting up JetStream") }, false, "starting: setting up JetStream"},
		{"delegated, worker ready", func(r *Readiness) { r.Delegate(workerReady) }, true, ""},
		{"delegated, worker not ready", func(r *Readiness) { r.Delegate(workerNot) }, false, "NATS not connected"},
		{"a step after delegating changes nothing", func(r *Readiness) {
			r.Delegate(workerReady)
			r.Starting("setting up JetStream")
		}, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReadiness("connecting to NATS")
			tt.steps(r)
			if ok, why := r.Ready(); ok != tt.ok || why != tt.reason {
				t.Errorf("Ready() = %v, %q; want %v, %q", ok, why, tt.ok, tt.reason)
			}
		})
	}
}

// /readyz follows the steps while requests come in concurrently (run with
// -race).
func TestReadinessServed(t *testing.T) {
	r := NewReadiness("connecting to NATS")
	srv := httptest.NewServer(Handler(prometheus.NewRegistry(), r.Ready))
	t.Cleanup(srv.Close)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	readyz := func() (int, string) {
		resp, err := client.Get(srv.URL + "/readyz")
		if err != nil {
			t.Error(err)
			return 0, ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	if code, body := readyz(); code != 503 || body != "not ready: starting: connecting to NATS\n" {
		t.Fatalf("readyz = %d %q", code, body)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				if code, _ := readyz(); code != 503 && code != 200 {
					t.Errorf("readyz = %d", code)
				}
			}
		}()
	}
	r.Starting("setting up JetStream")
	r.Delegate(func() (bool, string) { return true, "" })
	wg.Wait()
	if code, body := readyz(); code != 200 || body != "ready\n" {
		t.Fatalf("readyz after Delegate = %d %q", code, body)
	}
}
