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
)

// banner is what `worker dev` prints on stdout.
type banner struct {
	natsURL   string
	httpAddr  string // host:port
	instances []string
	pubJSON   string   // payload of the `nats pub` line
	stopLine  string   // the `worker stop` line, trimmed
	stopEnv   string   // NATS_URL=... of that line
	stopArgs  []string // arguments after `stop` on that line
}

func parseBanner(t *testing.T, text string) banner {
	t.Helper()
	var b banner
	inInstances := false
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\r\n")
		f := strings.Fields(line)
		switch {
		case inInstances && len(f) == 1:
			b.instances = append(b.instances, f[0])
			continue
		case inInstances:
			inInstances = false
		}
		switch {
		case strings.HasPrefix(line, "NATS URL:") && len(f) >= 3:
			b.natsURL = f[2]
		case strings.HasPrefix(line, "HTTP address:") && len(f) >= 3:
			b.httpAddr = strings.TrimPrefix(f[2], "http://")
		case strings.HasPrefix(line, "Running instances ready to stop:"):
			inInstances = true
		case strings.Contains(line, " pub dlf.stop.request '"):
			i, j := strings.Index(line, "'"), strings.LastIndex(line, "'")
			if j > i {
				b.pubJSON = line[i+1 : j]
			}
		case strings.Contains(line, " stop --script "):
			b.stopLine = strings.TrimSpace(line)
			if len(f) > 0 && strings.HasPrefix(f[0], "NATS_URL=") {
				b.stopEnv = strings.TrimPrefix(f[0], "NATS_URL=")
			}
			_, after, _ := strings.Cut(line, " stop ")
			b.stopArgs = strings.Fields(after)
		}
	}
	if b.natsURL == "" || b.httpAddr == "" || len(b.instances) == 0 || b.pubJSON == "" || b.stopArgs == nil {
		t.Fatalf("banner incomplete (%+v):\n%s", b, text)
	}
	return b
}

func TestDev(t *testing.T) {
	// Take the preferred ports so the fallback to free ports is what runs
	// (when another process holds them already, that is the fallback too).
	held4222 := hold(t, "127.0.0.1:4222")
	held8080 := hold(t, "127.0.0.1:8080")
	tmp := t.TempDir()
	dev := start(t, map[string]string{"TMPDIR": tmp}, "dev")
	b := parseBanner(t, dev.waitStdout(t, " stop --script ", 30*time.Second))

	if held4222 && strings.HasSuffix(b.natsURL, ":4222") {
		t.Errorf("NATS URL %s uses port 4222, which the test holds", b.natsURL)
	}
	if held8080 && b.httpAddr == "127.0.0.1:8080" {
		t.Errorf("HTTP address %s is the one the test holds", b.httpAddr)
	}
	if b.stopEnv != b.natsURL {
		t.Errorf("worker stop line uses NATS_URL=%s, banner says %s", b.stopEnv, b.natsURL)
	}
	if len(b.instances) < 2 {
		t.Fatalf("instances = %v, want at least 2", b.instances)
	}
	waitHTTP(t, dev, "http://"+b.httpAddr+"/healthz", http.StatusOK, 10*time.Second)
	waitHTTP(t, dev, "http://"+b.httpAddr+"/readyz", http.StatusOK, 10*time.Second)

	// The printed worker stop line names this binary; pasted into a shell
	// as it is, it stops its instance.
	if f := strings.Fields(b.stopLine); len(f) < 3 || f[1] != workerBin || f[2] != "stop" {
		t.Errorf("worker stop line %q: want NATS_URL=... %s stop ...", b.stopLine, workerBin)
	}
	var stop *child
	if _, err := os.Stat("/bin/sh"); err == nil {
		stop = startProgram(t, "/bin/sh", nil, "-c", b.stopLine)
	} else {
		stop = start(t, map[string]string{"NATS_URL": b.stopEnv}, append([]string{"stop"}, b.stopArgs...)...)
	}
	if code := stop.wait(t, 35*time.Second); code != 0 {
		t.Errorf("%s: exit %d, want 0\nstderr: %s", b.stopLine, code, stop.stderr.String())
	}
	out := stop.stdout.String()
	if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") || !strings.Contains(out, `"status":"stopped"`) {
		t.Errorf("worker stop stdout = %q, want one JSON line with \"status\":\"stopped\"", out)
	}
	var so consumer.Outcome
	if err := json.Unmarshal([]byte(out), &so); err != nil || !slices.Contains(b.instances, so.InstanceID) {
		t.Errorf("worker stop outcome %q (%v): want one for a listed instance", out, err)
	}

	// The printed nats pub line's payload, published as the nats CLI does.
	nc := connect(t, b.natsURL)
	got := watchOutcomes(t, nc)
	var pub consumer.Outcome
	if err := json.Unmarshal([]byte(b.pubJSON), &pub); err != nil {
		t.Fatalf("nats pub payload %q: %v", b.pubJSON, err)
	}
	if !slices.Contains(b.instances, pub.InstanceID) || pub.InstanceID == so.InstanceID {
		t.Errorf("nats pub line stops %q; want a listed instance the worker stop line does not stop", pub.InstanceID)
	}
	if err := nc.Publish("dlf.stop.request", []byte(b.pubJSON)); err != nil {
		t.Fatal(err)
	}
	o := got.wait(t, 15*time.Second, func(o consumer.Outcome) bool { return o.InstanceID == pub.InstanceID })
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
