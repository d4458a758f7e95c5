package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/service"
	"github.com/dlf-stop/worker/internal/stopcli"
	"github.com/dlf-stop/worker/internal/testutil"
)

// TestWorkerRunsAsDeployed runs the real worker with the environment the
// Kubernetes manifests give it (ConfigMap, file variables, NATS user)
// against nats-server started from nats-server.conf with the streams
// created from the definition files, and a DLF emulator. Only what cannot
// be the same here is replaced: the addresses, one stream replica, and the
// secret values. A scheduler publishes, the worker stops the instance or
// rejects the command, and an auditor reads the dead letter: every
// permission the worker needs at run time is exercised.
func TestWorkerRunsAsDeployed(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nats-server, the DLF emulator and the worker")
	}
	s := startConfServer(t)
	operator := connectAs(t, s, "dlf-worker")
	files := readStreamFiles(t)
	for _, w := range wantStreams() {
		apiRequest(t, operator, "$JS.API.STREAM.CREATE."+w.name, definition(t, files, w.name+".json", 1))
	}
	apiRequest(t, operator, "$JS.API.CONSUMER.CREATE."+stopStream+"."+consumerName+"."+stopSubject, map[string]any{
		"stream_name": stopStream, "config": definition(t, files, consumerFile, 0), "action": "create",
	})

	const ak, sk, project, workspace = "AKDEPLOYTEST", "SKDEPLOYTEST", "proj-1", "ws-1"
	emu, dlfURL := emulator.StartForTest(t, emulator.WithCredentials(ak, sk))
	emu.AddRunning(project, workspace, "nightly", "inst-1")
	emu.AddRunning(project, workspace, "nightly", "inst-2")

	// The stored outcome of an earlier command with the id deploy-readback
	// (a publisher that reuses ids). The worker's own outcome for the
	// command published below is dropped as its duplicate; the worker
	// reads the stored one back (STREAM.INFO and STREAM.MSG.GET on the
	// outcome stream), sees another command's, and acks without an
	// outcome of its own (contract section 6). Unable to read it, the
	// worker would keep its own decision without counting a reused id.
	earlier := nats.NewMsg(outcomePrefix + ".failed")
	earlier.Header.Set(nats.MsgIdHdr, "deploy-readback")
	earlier.Data = []byte(`{"command_id":"deploy-readback","status":"failed","cause":"dlf_error","error_code":"DLF.0100","attempts":1}`)
	{
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := operator.js.PublishMsg(ctx, earlier); err != nil {
			t.Fatalf("store the earlier outcome: %v", err)
		}
		cancel()
	}

	// The worker's environment, from the manifests.
	ms := loadManifests(t)
	_, c, err := workerDeployment(ms)
	if err != nil {
		t.Fatal(err)
	}
	env, problems := containerEnv(ms, c)
	if len(problems) > 0 {
		t.Fatal(problems)
	}
	secretValues := map[string]string{"ak": ak, "sk": sk, "nats-password": envSentinel("DLF_WORKER_PASSWORD")}
	dir := t.TempDir()
	for name, val := range env {
		if !fileEnv(name) || val == "" {
			continue
		}
		v, ok := secretValues[path.Base(val)]
		if !ok {
			t.Fatalf("%s=%s: no test value for Secret key %s", name, val, path.Base(val))
		}
		local := filepath.Join(dir, path.Base(val))
		if err := os.WriteFile(local, []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		env[name] = local
	}
	for k, v := range map[string]string{
		"NATS_URL":                   s.ClientURL(),
		"DLF_ENDPOINT":               dlfURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": project,
		"DLF_WORKSPACE":              workspace,
		"STREAM_REPLICAS":            "1",
		"HTTP_ADDR":                  "127.0.0.1:0",
	} {
		env[k] = v
	}
	cfg, err := config.FromEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatalf("config: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	started := make(chan string, 1)
	done := make(chan error, 1)
	// The worker's own warnings, to see a permission it lacks on a path
	// that tolerates the failure (the server reports a violation only in
	// an asynchronous error, which the worker logs).
	core, logged := observer.New(zap.WarnLevel)
	t.Cleanup(func() { // also when the test failed on what such a violation broke
		for _, e := range logged.All() {
			if line := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(strings.ToLower(line), "permissions violation") {
				t.Errorf("the worker met a permissions violation: %s", line)
			}
		}
	})
	go func() {
		done <- service.Run(ctx, cfg, zap.New(core), service.Hooks{Started: func(addr string) { started <- addr }})
	}()
	var httpAddr string
	select {
	case httpAddr = <-started:
	case err := <-done:
		t.Fatalf("worker exited at start: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("worker did not start")
	}
	testutil.WaitFor(t, 10*time.Second, "worker /readyz 200", func() bool {
		resp, err := http.Get("http://" + httpAddr + "/readyz")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	scheduler := connectAs(t, s, "scheduler")
	outcomes, err := scheduler.nc.SubscribeSync(outcomePrefix + ".*")
	if err != nil {
		t.Fatal(err)
	}
	if err := scheduler.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
	defer pcancel()
	for id, body := range map[string]string{
		"deploy-stop":   `{"script_name":"nightly","instance_id":"inst-1"}`,
		"deploy-reject": `{"script_name":"nightly"}`,
		// Its outcome is the stored one above (see there).
		"deploy-readback": `{"script_name":"nightly","instance_id":"inst-2"}`,
	} {
		if _, err := scheduler.js.Publish(pctx, stopSubject, []byte(body), jetstream.WithMsgID(id)); err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
	}
	// Outcome events as published: deploy-readback's is published too
	// (core subscribers see a publish the stream drops as a duplicate),
	// so only the other two are waited for here.
	got := map[string]string{}
	for got["deploy-stop"] == "" || got["deploy-reject"] == "" {
		m, err := outcomes.NextMsg(30 * time.Second)
		if err != nil {
			t.Fatalf("waiting for outcomes (have %v): %v", got, err)
		}
		var ev struct {
			CommandID string `json:"command_id"`
			Status    string `json:"status"`
		}
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			t.Fatalf("outcome %q: %v", m.Data, err)
		}
		got[ev.CommandID] = ev.Status
	}
	if got["deploy-stop"] != "stopped" || got["deploy-reject"] != "rejected" {
		t.Errorf("outcomes %v; want deploy-stop stopped, deploy-reject rejected", got)
	}
	if !emu.Stopped(project, "nightly", "inst-1") {
		t.Error("the emulator's instance was not stopped")
	}

	auditor := connectAs(t, s, "auditor")
	dc, err := auditor.js.OrderedConsumer(pctx, deadStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if m := fetchOne(t, dc); m.Headers().Get(nats.MsgIdHdr) != "deploy-reject" {
		t.Errorf("dead letter %v; want deploy-reject", m.Headers())
	}
	// One stored outcome per command id: deploy-readback's is the earlier
	// command's, read back.
	oc, err := auditor.js.OrderedConsumer(pctx, outcomeStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	stored := map[string][]string{}
	for range 3 {
		m := fetchOne(t, oc)
		id := m.Headers().Get(nats.MsgIdHdr)
		stored[id] = append(stored[id], m.Subject())
	}
	if want := []string{outcomePrefix + ".failed"}; !slices.Equal(stored["deploy-readback"], want) {
		t.Errorf("stored outcomes of deploy-readback: %v; want %v", stored["deploy-readback"], want)
	}
	if info, err := oc.Info(pctx); err != nil || info.NumPending != 0 {
		t.Errorf("outcome stream after three outcomes: %+v %v; want nothing more", info, err)
	}
	if !emu.Stopped(project, "nightly", "inst-2") {
		t.Error("the reused id's command did not stop its instance")
	}
	testutil.WaitFor(t, 10*time.Second, "dlf_stop_command_ids_reused_total 1", func() bool {
		resp, err := http.Get("http://" + httpAddr + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return err == nil && strings.Contains(string(body), "\ndlf_stop_command_ids_reused_total 1\n")
	})

	// Acked: the work queue is empty.
	testutil.WaitFor(t, 10*time.Second, "DLF_STOP empty", func() bool {
		st, err := operator.js.Stream(pctx, stopStream)
		return err == nil && st.CachedInfo().State.Msgs == 0
	})

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("worker shutdown: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("worker did not stop")
	}
	for _, u := range []*natsUser{operator, scheduler, auditor} {
		u.noViolations(t)
	}
}

// A worker whose NATS user may not use the stream it is configured for (a
// STOP_STREAM changed without the permissions in nats-server.conf) stops
// at once with an error that names the permission problem, not after the
// set-up timeout with "context deadline exceeded".
func TestWorkerWithoutPermissionSaysSo(t *testing.T) {
	s := startConfServer(t)
	env := map[string]string{
		"NATS_URL": s.ClientURL(), "NATS_USER": "dlf-worker", "NATS_PASSWORD": envSentinel("DLF_WORKER_PASSWORD"),
		"DLF_ENDPOINT": "http://127.0.0.1:9", "HTTP_ADDR": "127.0.0.1:0", "STOP_STREAM": "OTHER_STOP",
	}
	cfg, err := config.FromEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	err = service.Run(ctx, cfg, zap.NewNop(), service.Hooks{})
	took := time.Since(start)
	if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), "OTHER_STOP") {
		t.Errorf("start-up error = %v; want the permissions violation, naming the stream", err)
	}
	if strings.Contains(err.Error(), envSentinel("DLF_WORKER_PASSWORD")) {
		t.Errorf("start-up error holds the NATS password: %v", err)
	}
	if took > 10*time.Second {
		t.Errorf("start-up took %s to fail", took.Round(time.Millisecond))
	}
}

// `worker stop` run with a user that may not publish stop commands nor
// hear outcomes (the worker's own, say, as from inside its pod) says so at
// once, before it publishes anything, instead of waiting out --wait and
// naming only the timeout (found by review).
func TestStopWithoutPermissionSaysSo(t *testing.T) {
	s := startConfServer(t)
	// The streams exist, as once the worker has started.
	operator := connectAs(t, s, "dlf-worker")
	files := readStreamFiles(t)
	for _, w := range wantStreams() {
		apiRequest(t, operator, "$JS.API.STREAM.CREATE."+w.name, definition(t, files, w.name+".json", 1))
	}
	env := map[string]string{
		"NATS_URL": s.ClientURL(), "NATS_USER": "dlf-worker", "NATS_PASSWORD": envSentinel("DLF_WORKER_PASSWORD"),
	}
	var stdout, stderr strings.Builder
	start := time.Now()
	code := stopcli.Run(context.Background(), []string{"--script", "s", "--instance", "i", "--wait", "20s"},
		func(k string) (string, bool) { v, ok := env[k]; return v, ok }, &stdout, &stderr)
	took := time.Since(start)
	if code != stopcli.ExitNoOutcome || stdout.Len() != 0 {
		t.Errorf("exit %d, stdout %q; want %d and nothing", code, stdout.String(), stopcli.ExitNoOutcome)
	}
	if msg := stderr.String(); !strings.Contains(msg, "nothing was published") || !strings.Contains(msg, `Permissions Violation for Publish to "$JS.API.CONSUMER.`) ||
		strings.Contains(msg, envSentinel("DLF_WORKER_PASSWORD")) {
		t.Errorf("stderr = %q; want the permissions violation for the outcomes, before publishing, without the password", msg)
	}
	if took > 10*time.Second {
		t.Errorf("took %s to fail", took.Round(time.Millisecond))
	}
}
