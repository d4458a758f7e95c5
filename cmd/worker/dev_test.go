package main

import (
	"encoding/json"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestDev(t *testing.T) {
	// Take the preferred ports so the fallback to free ports is what runs
	// (when another process holds them already, that is the fallback too).
	held4222 := hold(t, "127.0.0.1:4222")
	held8080 := hold(t, "127.0.0.1:8080")
	tmp := t.TempDir()
	dev := start(t, map[string]string{"TMPDIR": tmp}, "dev")
	b, err := testutil.ParseDevBanner(dev.waitStdout(t, " stop --script ", 30*time.Second))
	if err != nil {
		t.Fatal(err)
	}

	if held4222 && strings.HasSuffix(b.NATSURL, ":4222") {
		t.Errorf("NATS URL %s uses port 4222, which the test holds", b.NATSURL)
	}
	if held8080 && b.HTTPAddr == "127.0.0.1:8080" {
		t.Errorf("HTTP address %s is the one the test holds", b.HTTPAddr)
	}
	if b.StopEnv != b.NATSURL {
		t.Errorf("worker stop line uses NATS_URL=%s, banner says %s", b.StopEnv, b.NATSURL)
	}
	if len(b.Instances) < 2 {
		t.Fatalf("instances = %v, want at least 2", b.Instances)
	}
	waitHTTP(t, dev, "http://"+b.HTTPAddr+"/healthz", http.StatusOK, 10*time.Second)
	waitHTTP(t, dev, "http://"+b.HTTPAddr+"/readyz", http.StatusOK, 10*time.Second)

	// The printed worker stop line names this binary; pasted into a shell
	// as it is, it stops its instance.
	if f := strings.Fields(b.StopLine); len(f) < 3 || f[1] != workerBin || f[2] != "stop" {
		t.Errorf("worker stop line %q: want NATS_URL=... %s stop ...", b.StopLine, workerBin)
	}
	var stop *child
	if _, err := os.Stat("/bin/sh"); err == nil {
		stop = startProgram(t, "/bin/sh", nil, "-c", b.StopLine)
	} else {
		stop = start(t, map[string]string{"NATS_URL": b.StopEnv}, append([]string{"stop"}, b.StopArgs...)...)
	}
	if code := stop.wait(t, 35*time.Second); code != 0 {
		t.Errorf("%s: exit %d, want 0\nstderr: %s", b.StopLine, code, stop.stderr.String())
	}
	out := stop.stdout.String()
	if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") || !strings.Contains(out, `"status":"stopped"`) {
		t.Errorf("worker stop stdout = %q, want one JSON line with \"status\":\"stopped\"", out)
	}
	var so consumer.Outcome
	if err := json.Unmarshal([]byte(out), &so); err != nil || !slices.Contains(b.Instances, so.InstanceID) {
		t.Errorf("worker stop outcome %q (%v): want one for a listed instance", out, err)
	}

	// The printed nats pub line's payload, published as the nats CLI does.
	nc := connect(t, b.NATSURL)
	got := watchOutcomes(t, nc)
	var pub consumer.Outcome
	if err := json.Unmarshal([]byte(b.PubJSON), &pub); err != nil {
		t.Fatalf("nats pub payload %q: %v", b.PubJSON, err)
	}
	if !slices.Contains(b.Instances, pub.InstanceID) || pub.InstanceID == so.InstanceID {
		t.Errorf("nats pub line stops %q; want a listed instance the worker stop line does not stop", pub.InstanceID)
	}
	if err := nc.Publish("dlf.stop.request", []byte(b.PubJSON)); err != nil {
		t.Fatal(err)
	}
	o := got.Wait(t, 15*time.Second, func(o consumer.Outcome) bool { return o.InstanceID == pub.InstanceID })
	if o.Status != "stopped" || o.HTTPStatus != 204 {
		t.Errorf("nats pub line: outcome %+v, want stopped with 204", o)
	}
	nc.Close()

	start := time.Now()
	if code := dev.signal(t, os.Interrupt, 15*time.Second); code != 0 {
		t.Errorf("worker dev exit after SIGINT = %d, want 0\nstderr:\n%s", code, dev.stderr.String())
	}
	t.Logf("worker dev exited %s after SIGINT", time.Since(start).Round(time.Millisecond))
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("worker dev left %d entries in TMPDIR (%s...)", len(left), left[0].Name())
	}
}
