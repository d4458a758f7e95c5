package e2e

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
	"github.com/dlf-stop/worker/internal/testutil"
	"github.com/dlf-stop/worker/internal/testutil/natsjwt"
)

// secretsGuard gives a failure test real secrets to hold, so that every
// failure test is also a secrets test at debug level (issue: "all of the
// above at debug level, then search every log line, outcome and dead
// letter for the AK, SK, token, NATS password and creds seed"). Each run
// holds one of two sets; between them the failure tests cover every
// secret the issue names:
//
//   - guardAKSK: an AK in the environment and an SK in a file, which the
//     emulator demands, and a NATS user whose password is in a file, which
//     the server demands;
//   - guardTokenCreds: an IAM token in a file, which the emulator demands,
//     and a NATS creds file (JWT and seed) of an account the server, in
//     operator mode, trusts.
type secretsGuard struct {
	auth               guardAuth
	ak, sk, user, pw   string
	token, seed, creds string
	op                 *natsjwt.Operator
	env                map[string]string // for the worker: credentials and LOG_LEVEL=debug
}

type guardAuth int

const (
	guardAKSK guardAuth = iota
	guardTokenCreds
)

func (a guardAuth) String() string {
	if a == guardTokenCreds {
		return "token_file+nats_creds"
	}
	return "aksk+nats_password_file"
}

func newSecretsGuard(t *testing.T, auth guardAuth) *secretsGuard {
	t.Helper()
	dir := t.TempDir()
	g := &secretsGuard{auth: auth}
	switch auth {
	case guardAKSK:
		g.ak = "AKGUARD" + strings.ToUpper(randHex(t, 6))
		g.sk = "sk-GUARDED-" + randHex(t, 16)
		g.user = "worker"
		g.pw = "pw-GUARDED-" + randHex(t, 16)
		g.env = map[string]string{
			"NATS_USER":               g.user,
			"NATS_PASSWORD_FILE":      writeSecretFile(t, dir, "password", g.pw),
			"HUAWEICLOUD_SDK_AK":      g.ak,
			"HUAWEICLOUD_SDK_SK_FILE": writeSecretFile(t, dir, "sk", g.sk),
		}
	case guardTokenCreds:
		g.token = "tok-GUARDED-" + randHex(t, 24)
		g.op = natsjwt.NewOperator(t)
		g.creds, g.seed = natsjwt.Creds(t, dir, "worker.creds", g.op.Account(t, true, true), nil)
		g.env = map[string]string{
			"NATS_CREDS":          g.creds,
			"DLF_AUTH_TOKEN_FILE": writeSecretFile(t, dir, "token", g.token),
		}
	default:
		t.Fatalf("unknown guard auth %d", auth)
	}
	g.env["LOG_LEVEL"], g.env["LOG_FORMAT"] = "debug", "json"
	return g
}

// server runs a JetStream server that accepts only the guard's NATS
// credentials.
func (g *secretsGuard) server(t *testing.T) *server.Server {
	t.Helper()
	if g.auth == guardTokenCreds {
		o := &server.Options{}
		g.op.Configure(t, o)
		return startAuthServer(t, o)
	}
	return startAuthServer(t, &server.Options{Username: g.user, Password: g.pw})
}

// connect is the test's own connection to that server.
func (g *secretsGuard) connect(t *testing.T, srv *server.Server) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	if g.auth == guardTokenCreds {
		return testutil.ConnectJS(t, srv.ClientURL(), nats.UserCredentials(g.creds))
	}
	return testutil.ConnectJS(t, srv.ClientURL(), nats.UserInfo(g.user, g.pw))
}

func (g *secretsGuard) emulatorOption() emulator.Option {
	if g.auth == guardTokenCreds {
		return emulator.WithAuthToken(g.token)
	}
	return emulator.WithCredentials(g.ak, g.sk)
}

// credentials are the DLF credentials for an in-process DLF client.
func (g *secretsGuard) credentials() dlf.Credentials {
	return dlf.Credentials{AK: g.ak, SK: g.sk, AuthToken: g.token}
}

// workerEnv is env with the guard's settings added (they win).
func (g *secretsGuard) workerEnv(env map[string]string) map[string]string {
	out := make(map[string]string, len(env)+len(g.env))
	for k, v := range env {
		out[k] = v
	}
	for k, v := range g.env {
		out[k] = v
	}
	return out
}

// check reads the outcome and dead-letter streams in full and searches
// them, and every log line of every worker process, for the secrets. It
// reports the figure line "secrets run=... hits=0".
func (g *secretsGuard) check(t *testing.T, js jetstream.JetStream, run string, logs [][]string) {
	t.Helper()
	g.search(t, js, run, logs, true)
}

// encodedNeedles are secret as it is and as it would show if some code
// encoded it: hex, and base64 in both alphabets, padded or not, and at each
// of the three alignments it can have inside a longer encoded string (the
// characters that depend on its bytes alone).
func encodedNeedles(name, secret string) []secretNeedle {
	out := []secretNeedle{{name, secret}, {name + " hex", hex.EncodeToString([]byte(secret))}}
	for _, enc := range []struct {
		name string
		e    *base64.Encoding
	}{{"base64", base64.StdEncoding}, {"base64url", base64.URLEncoding}} {
		for k := 0; k < 3; k++ {
			s := enc.e.EncodeToString([]byte(strings.Repeat("\x00", k) + secret))
			from, to := (8*k+5)/6, 8*(k+len(secret))/6
			out = append(out, secretNeedle{fmt.Sprintf("%s %s at offset %d", name, enc.name, k), s[from:to]})
		}
	}
	return out
}

// search is check; processes says the logs are worker processes' stderr,
// each of which must have started at debug level (in-process workers log
// to the test's own debug-level core instead).
func (g *secretsGuard) search(t *testing.T, js jetstream.JetStream, run string, logs [][]string, processes bool) {
	t.Helper()
	needles := []secretNeedle{{"secret marker", "-GUARDED-"}}
	switch g.auth {
	case guardAKSK:
		needles = append(needles, secretNeedle{"AK", g.ak})
		needles = append(needles, encodedNeedles("SK", g.sk)...)
		needles = append(needles, encodedNeedles("NATS password", g.pw)...)
		needles = append(needles, encodedNeedles("NATS user:password", g.user+":"+g.pw)...)
	case guardTokenCreds:
		needles = append(needles, encodedNeedles("IAM token", g.token)...)
		needles = append(needles, secretNeedle{"creds seed", g.seed},
			// The seed's body without the "SU" prefix, as a partial print would show it.
			secretNeedle{"creds seed body", g.seed[2:]})
	}
	var hay []haystack
	lines, debug, atDebug := 0, 0, 0
	for p, ls := range logs {
		for i, l := range ls {
			hay = append(hay, haystack{fmt.Sprintf("worker %d log line %d", p+1, i+1), l})
			if strings.Contains(l, `"level":"debug"`) || strings.HasPrefix(l, "debug ") {
				debug++
			}
			if strings.Contains(l, `"msg":"starting"`) && strings.Contains(l, `"LOG_LEVEL":"debug"`) {
				atDebug++
			}
		}
		lines += len(ls)
	}
	outs := faultReadAll(t, js, "DLF_STOP_OUTCOMES")
	deads := faultReadAll(t, js, "DLF_STOP_DEAD")
	hay = storedHay(hay, "outcome", outs, renderMsg)
	hay = storedHay(hay, "dead letter", deads, renderMsg)
	hits, found := searchHay(hay, needles)
	t.Logf("secrets run=%s auth=%s log_lines=%d debug_lines=%d outcomes=%d dead_letters=%d needles=%d hits=%d",
		run, g.auth, lines, debug, len(outs), len(deads), len(needles), hits)
	if hits != 0 {
		t.Errorf("%d secret hits:\n%s", hits, strings.Join(found[:min(len(found), 10)], "\n"))
	}
	// A run without retries may log nothing at debug, but every process
	// must have started at that level.
	if processes && atDebug != len(logs) {
		t.Errorf("%d of %d worker processes started with LOG_LEVEL=debug", atDebug, len(logs))
	}
}

// renderMsg is a stored message as text: subject, headers, body.
func renderMsg(m jetstream.Msg) string { return renderStored(m.Subject(), m.Headers(), m.Data()) }

// renderStored is a message as text: subject, headers in key order, body.
func renderStored(subject string, h nats.Header, data []byte) string {
	var b strings.Builder
	b.WriteString(subject + "\n")
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		for _, v := range h[k] {
			b.WriteString(k + ": " + v + "\n")
		}
	}
	b.Write(data)
	return b.String()
}

// storedHay adds stored messages, rendered, as haystacks named what 1,
// what 2, ...
func storedHay[M any](hay []haystack, what string, msgs []M, render func(M) string) []haystack {
	for i, m := range msgs {
		hay = append(hay, haystack{fmt.Sprintf("%s %d", what, i+1), render(m)})
	}
	return hay
}

// haystack is one text searched for secrets, and where it came from.
type haystack struct{ where, text string }

// searchHay finds every needle in every haystack and describes each hit
// with some context.
func searchHay(hay []haystack, needles []secretNeedle) (hits int, found []string) {
	for _, h := range hay {
		for _, n := range needles {
			if n.value == "" {
				continue
			}
			if at := strings.Index(h.text, n.value); at >= 0 {
				hits++
				from, to := max(0, at-80), min(len(h.text), at+len(n.value)+40)
				found = append(found, fmt.Sprintf("%s in %s: ...%s...", n.what, h.where, h.text[from:to]))
			}
		}
	}
	return hits, found
}

// A secret encoded inside a longer string, whatever its alignment, is
// found by one of its needles.
func TestEncodedNeedlesFindEmbeddedSecrets(t *testing.T) {
	const secret = "sk-GUARDED-0123456789abcdef"
	needles := encodedNeedles("SK", secret)
	for pre := 0; pre < 6; pre++ {
		for _, e := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
			hay := e.EncodeToString([]byte(strings.Repeat("x", pre) + secret + "-tail"))
			found := false
			for _, n := range needles {
				found = found || strings.Contains(hay, n.value)
			}
			if !found {
				t.Errorf("secret after %d bytes not found in %s", pre, hay)
			}
		}
	}
}
