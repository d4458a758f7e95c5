package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/dlf-stop/worker/internal/command"
	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
	"github.com/dlf-stop/worker/internal/testutil/natsjwt"
)

// TestSecretsNeverLeak pins "secrets are never logged, never put in
// outcomes or dead letters" (contract section 7) on the real binary at
// debug level: every stderr line, every outcome event and every dead letter
// (bodies and headers) is searched for every secret the worker held or
// produced - AK, SK before and after a rotation, NATS password, IAM token,
// nkey seed, and every Authorization signature and X-Auth-Token DLF saw.
func TestSecretsNeverLeak(t *testing.T) {
	t.Run("aksk_files_user_password", secretsAKSKRun)
	t.Run("token_file_nkey", secretsTokenRun)
}

const secretsProject = "p"

// secretsAKSKRun: AK/SK from files with one SK rotation, NATS user and
// password file; 200 valid and 100 invalid commands, a 401 phase and a 503
// phase.
func secretsAKSKRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var (
		ak    = "AKPUBLIC" + strings.ToUpper(randHex(t, 6))
		sk    = "sk-SECRET-7f3a9c" + randHex(t, 16)
		newSK = "sk-SECRET-rotated-" + randHex(t, 16)
		pw    = "pw-SECRET-" + randHex(t, 16)
		user  = "worker"
	)
	srv := startAuthServer(t, &server.Options{Username: user, Password: pw})
	_, js := testutil.ConnectJS(t, srv.ClientURL(), nats.UserInfo(user, pw))
	emu, emuURL := emulator.StartForTest(t, emulator.WithCredentials(ak, sk))

	dir := t.TempDir()
	akFile := writeSecretFile(t, dir, "ak", ak)
	skFile := writeSecretFile(t, dir, "sk", sk)
	pwFile := writeSecretFile(t, dir, "password", pw)

	w := startWorker(t, debugWorkerEnv(t, srv.ClientURL(), emuURL, map[string]string{
		"NATS_USER":               user,
		"NATS_PASSWORD_FILE":      pwFile,
		"HUAWEICLOUD_SDK_AK_FILE": akFile,
		"HUAWEICLOUD_SDK_SK_FILE": skFile,
	}))
	wl := newSecretsWorkload(ctx, t, js, emu, w)

	// Normal: 70 running, 10 unknown instances (400 DLF.6205, failed and
	// dead-lettered), 50 invalid.
	wl.round("normal", 70, 10, 50)
	wl.expectStopped("normal")

	// 401 from the gateway: the worker retries (circuit open, probes) and
	// the commands go through once it is lifted.
	emu.SetFaults(emulator.Faults{AuthFail: true})
	ids := wl.publish("auth-fail", 20, 0, 0)
	wl.waitFaults("auth_fail", 3)
	emu.SetFaults(emulator.Faults{})
	wl.waitOutcomes(ids)
	wl.expectStopped("auth-fail")

	// 503 on every call, then lifted.
	emu.SetFaults(emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	ids = wl.publish("unavailable", 20, 0, 0)
	wl.waitFaults("error", 3)
	emu.SetFaults(emulator.Faults{})
	wl.waitOutcomes(ids)
	wl.expectStopped("unavailable")

	// SK rotation: the file is rewritten in place and DLF accepts only the
	// new SK. Commands after it must go through without a restart.
	if err := os.WriteFile(skFile, []byte(newSK+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	emu.SetCredentials(ak, newSK)
	before := len(emu.Requests())
	wl.round("rotated", 80, 0, 50)
	wl.expectStopped("rotated")
	if err := wl.proc.check(); err != nil {
		t.Fatalf("worker restarted or died around the SK rotation: %v", err)
	}
	refused := countFault(emu.Requests()[before:], "auth")
	t.Logf("after the SK rotation: %d of %d DLF calls refused (old SK) before the worker picked up the new one, pid %d throughout",
		refused, len(emu.Requests())-before, w.cmd.Process.Pid)
	// AK rotation the IAM way: the old AK is deleted before the files
	// follow, and the gateway's 401 names it ("Get secretKey failed,
	// ak:<AK>,err:ak not exist"), an echo the worker must keep out of
	// its logs, outcomes and dead letters. The files are rewritten once
	// the refusals were seen; the commands waited meanwhile.
	newAK := "AKPUBLIC" + strings.ToUpper(randHex(t, 6))
	newPairSK := "sk-SECRET-pair-" + randHex(t, 16)
	emu.SetCredentials(newAK, newPairSK)
	before = len(emu.Requests())
	ids = wl.publish("ak-rotation", 20, 0, 0)
	testutil.Eventually(t, 20*time.Second, func() error {
		if n := countFault(emu.Requests()[before:], "auth"); n < 3 {
			return fmt.Errorf("%d calls refused for the deleted AK, want 3", n)
		}
		return nil
	})
	if err := os.WriteFile(skFile, []byte(newPairSK+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(akFile, []byte(newAK+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wl.waitOutcomes(ids)
	wl.expectStopped("ak-rotation")

	if wl.valid != 220 || wl.invalid != 100 {
		t.Fatalf("workload: %d valid, %d invalid; want 220 and 100", wl.valid, wl.invalid)
	}

	secrets := []secretNeedle{{"AK", ak}, {"rotated AK", newAK}, {"secret marker", "-SECRET-"}}
	secrets = append(secrets, encodedNeedles("SK", sk)...)
	secrets = append(secrets, encodedNeedles("rotated SK", newSK)...)
	secrets = append(secrets, encodedNeedles("SK of the rotated AK", newPairSK)...)
	secrets = append(secrets, encodedNeedles("NATS password", pw)...)
	secrets = append(secrets, encodedNeedles("NATS user:password", user+":"+pw)...)
	wl.finish(secrets, "aksk_files+user_password_file")
}

// secretsTokenRun: IAM token from a file, NATS nkey seed file; a few valid
// and invalid commands, a 503 phase and a 401 phase.
func secretsTokenRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	token := "tok-SECRET-" + randHex(t, 24)
	kp, pub := natsjwt.NewKey(t, nkeys.CreateUser)
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	priv, err := kp.PrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	seedFile := writeSecretFile(t, dir, "user.nk", string(seed))
	tokenFile := writeSecretFile(t, dir, "token", token)

	srv := startAuthServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	nkOpt, err := nats.NkeyOptionFromSeed(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	_, js := testutil.ConnectJS(t, srv.ClientURL(), nkOpt)
	emu, emuURL := emulator.StartForTest(t, emulator.WithAuthToken(token))

	w := startWorker(t, debugWorkerEnv(t, srv.ClientURL(), emuURL, map[string]string{
		"NATS_NKEY":           seedFile,
		"DLF_AUTH_TOKEN_FILE": tokenFile,
	}))
	wl := newSecretsWorkload(ctx, t, js, emu, w)
	wl.round("normal", 50, 5, 30)
	wl.expectStopped("normal")

	emu.SetFaults(emulator.Faults{ErrorRate: 1, ErrorStatus: 503})
	ids := wl.publish("unavailable", 10, 0, 0)
	wl.waitFaults("error", 3)
	emu.SetFaults(emulator.Faults{})
	wl.waitOutcomes(ids)
	wl.expectStopped("unavailable")

	emu.SetFaults(emulator.Faults{AuthFail: true})
	ids = wl.publish("auth-fail", 5, 0, 0)
	wl.waitFaults("auth_fail", 2)
	emu.SetFaults(emulator.Faults{})
	wl.waitOutcomes(ids)
	wl.expectStopped("auth-fail")

	secrets := []secretNeedle{{"nkey seed", string(seed)}, {"nkey private key", string(priv)}, {"secret marker", "-SECRET-"}}
	secrets = append(secrets, encodedNeedles("IAM token", token)...)
	wl.finish(secrets, "token_file+nkey")
}

// secretNeedle is one string that must not appear anywhere.
type secretNeedle struct{ what, value string }

// secretsWorkload publishes commands to one worker and keeps what comes
// back.
type secretsWorkload struct {
	ctx   context.Context
	t     *testing.T
	js    jetstream.JetStream
	emu   *emulator.Emulator
	w     *child
	proc  *procWatch
	outs  *streamCollector
	deads *streamCollector

	seq            int
	valid, invalid int
	bad            [][]byte
	running        map[string][]string // phase -> ids of commands for running instances
}

func newSecretsWorkload(ctx context.Context, t *testing.T, js jetstream.JetStream, emu *emulator.Emulator, w *child) *secretsWorkload {
	t.Helper()
	wl := &secretsWorkload{ctx: ctx, t: t, js: js, emu: emu, w: w, proc: newProcWatch(w),
		running: map[string][]string{}}
	for _, b := range command.Corpus() {
		if len(b) < 512<<10 {
			wl.bad = append(wl.bad, b)
		}
	}
	waitForStreams(ctx, t, js, wl.proc)
	wl.outs = collectStream(ctx, t, js, "DLF_STOP_OUTCOMES")
	wl.deads = collectStream(ctx, t, js, "DLF_STOP_DEAD")
	return wl
}

// publish sends running valid commands for running instances, unknown
// valid ones for instances DLF does not know, and invalid ones, interleaved,
// and returns their ids.
func (wl *secretsWorkload) publish(phase string, running, unknown, invalid int) []string {
	wl.t.Helper()
	var ids []string
	for i := 0; i < max(running, unknown, invalid); i++ {
		if i < running {
			wl.seq++
			id, inst := fmt.Sprintf("%s-%04d", phase, wl.seq), fmt.Sprintf("run-%04d", wl.seq)
			wl.emu.AddRunning(secretsProject, "", "s", inst)
			wl.send(id, []byte(`{"script_name":"s","instance_id":"`+inst+`","reason":"secrets test `+phase+`"}`))
			wl.running[phase] = append(wl.running[phase], id)
			ids = append(ids, id)
			wl.valid++
		}
		if i < unknown {
			wl.seq++
			id := fmt.Sprintf("%s-%04d", phase, wl.seq)
			wl.send(id, []byte(`{"script_name":"s","instance_id":"gone-`+fmt.Sprint(wl.seq)+`"}`))
			ids = append(ids, id)
			wl.valid++
		}
		if i < invalid {
			wl.seq++
			id := fmt.Sprintf("%s-bad-%04d", phase, wl.seq)
			wl.send(id, wl.bad[wl.invalid%len(wl.bad)])
			ids = append(ids, id)
			wl.invalid++
		}
	}
	return ids
}

func (wl *secretsWorkload) send(id string, body []byte) {
	wl.t.Helper()
	if _, err := wl.js.Publish(wl.ctx, "dlf.stop.request", body, jetstream.WithMsgID(id)); err != nil {
		wl.t.Fatalf("publish %s: %v", id, err)
	}
}

// round publishes and waits until every command has an outcome.
func (wl *secretsWorkload) round(phase string, running, unknown, invalid int) {
	wl.t.Helper()
	wl.waitOutcomes(wl.publish(phase, running, unknown, invalid))
}

// outcomes decodes what has been read so far, by command id.
func (wl *secretsWorkload) outcomes() map[string]badOutcome {
	out := map[string]badOutcome{}
	for _, m := range wl.outs.all() {
		var o badOutcome
		if json.Unmarshal(m.data, &o) == nil {
			out[o.CommandID] = o
		}
	}
	return out
}

func (wl *secretsWorkload) waitOutcomes(ids []string) {
	wl.t.Helper()
	testutil.Eventually(wl.t, 30*time.Second, func() error {
		if err := wl.proc.check(); err != nil {
			return nil
		}
		got := wl.outcomes()
		missing := 0
		for _, id := range ids {
			if _, ok := got[id]; !ok {
				missing++
			}
		}
		if missing > 0 {
			return fmt.Errorf("%d of %d commands without an outcome", missing, len(ids))
		}
		return nil
	})
	if err := wl.proc.check(); err != nil {
		wl.t.Fatalf("%v; log: %s", err, tail(wl.w.lines(), 10))
	}
}

// waitFaults waits until the emulator has answered n stop calls with the
// named fault, so a fault phase really met the worker.
func (wl *secretsWorkload) waitFaults(fault string, n int) {
	wl.t.Helper()
	testutil.Eventually(wl.t, 20*time.Second, func() error {
		got := 0
		for _, r := range wl.emu.Requests() {
			if r.Fault == fault {
				got++
			}
		}
		if got < n {
			return fmt.Errorf("%d of %d calls answered with fault %q", got, n, fault)
		}
		return nil
	})
}

// expectStopped requires every command of phase for a running instance
// to have stopped it.
func (wl *secretsWorkload) expectStopped(phase string) {
	wl.t.Helper()
	got := wl.outcomes()
	var bad []string
	for _, id := range wl.running[phase] {
		if o := got[id]; o.Status != consumer.StatusStopped {
			bad = append(bad, fmt.Sprintf("%s=%s/%s %q", id, o.Status, o.Cause, o.Detail))
		}
	}
	if len(bad) > 0 {
		wl.t.Errorf("phase %s: %d of %d commands for running instances not stopped, e.g. %s",
			phase, len(bad), len(wl.running[phase]), sample(bad))
	}
}

// finish stops the worker with SIGTERM, reads everything it left behind and
// searches it for the secrets and for every credential DLF saw.
func (wl *secretsWorkload) finish(secrets []secretNeedle, run string) {
	t := wl.t
	t.Helper()
	if err := wl.proc.check(); err != nil {
		t.Fatalf("%v; log: %s", err, tail(wl.w.lines(), 10))
	}
	if err := terminate(wl.w, 30*time.Second); err != nil {
		t.Errorf("SIGTERM: %v; log: %s", err, tail(wl.w.lines(), 10))
	}
	readCollectedToEnd(wl.ctx, t, wl.js, wl.outs, wl.deads)

	// Every credential that went over the wire to DLF.
	needles := append([]secretNeedle(nil), secrets...)
	seen := map[string]bool{}
	sigs, tokens := 0, 0
	for _, r := range wl.emu.Requests() {
		if a := r.Header.Get("Authorization"); a != "" && !seen[a] {
			seen[a] = true
			needles = append(needles, secretNeedle{"Authorization header", a})
			if _, sig, ok := strings.Cut(a, "Signature="); ok && sig != "" {
				needles = append(needles, secretNeedle{"request signature", sig})
				sigs++
			}
		}
		if tok := r.Header.Get(emulator.HeaderAuthToken); tok != "" && !seen[tok] {
			seen[tok] = true
			needles = append(needles, secretNeedle{"X-Auth-Token", tok})
			tokens++
		}
	}
	if sigs+tokens == 0 {
		t.Errorf("DLF saw no Authorization signature and no X-Auth-Token: the requests were not authenticated")
	}

	var hay []haystack
	lines := wl.w.lines()
	debug := 0
	for i, l := range lines {
		hay = append(hay, haystack{fmt.Sprintf("log line %d", i+1), l})
		if strings.Contains(l, `"level":"debug"`) {
			debug++
		}
	}
	outs, deads := wl.outs.all(), wl.deads.all()
	render := func(m streamMsg) string { return renderStored(m.subject, m.header, m.data) }
	hay = storedHay(hay, "outcome", outs, render)
	hay = storedHay(hay, "dead letter", deads, render)

	hits, found := searchHay(hay, needles)
	t.Logf("secrets log_lines=%d outcomes=%d dead_letters=%d hits=%d run=%s debug_lines=%d needles=%d",
		len(lines), len(outs), len(deads), hits, run, debug, len(needles))
	if hits != 0 {
		t.Errorf("%d secret hits:\n%s", hits, strings.Join(found[:min(len(found), 10)], "\n"))
	}
	if len(lines) <= 100 {
		t.Errorf("only %d log lines at LOG_LEVEL=debug", len(lines))
	}
	if debug == 0 {
		t.Errorf("no debug-level line among %d: LOG_LEVEL=debug not in effect", len(lines))
	}
	if len(deads) == 0 || len(outs) == 0 {
		t.Errorf("nothing to search: %d outcomes, %d dead letters", len(outs), len(deads))
	}
}

// startAuthServer runs a JetStream server with the authentication in o.
func startAuthServer(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	o.Host, o.Port = "127.0.0.1", -1
	o.JetStream, o.StoreDir = true, t.TempDir()
	o.NoLog, o.NoSigs = true, true
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatal("nats server not ready within 10s")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

func writeSecretFile(t *testing.T, dir, name, value string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(value+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// debugWorkerEnv is the environment of both runs: debug JSON logs, fast
// retries, plus the run's own credentials in auth.
func debugWorkerEnv(t *testing.T, natsURL, emuURL string, auth map[string]string) map[string]string {
	env := map[string]string{
		"NATS_URL":                   natsURL,
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": secretsProject,
		"HTTP_ADDR":                  anyPort,
		"LOG_LEVEL":                  "debug",
		"LOG_FORMAT":                 "json",
		"RETRY_INITIAL_INTERVAL":     "50ms",
		"RETRY_MAX_INTERVAL":         "400ms",
		"RETRY_MAX_ELAPSED":          "60s",
	}
	for k, v := range auth {
		env[k] = v
	}
	return env
}

// countFault counts the requests the emulator answered with fault.
func countFault(reqs []emulator.Request, fault string) int {
	n := 0
	for _, r := range reqs {
		if r.Fault == fault {
			n++
		}
	}
	return n
}
