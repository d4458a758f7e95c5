package emulator

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/dlf-stop/worker/internal/dlf"
)

const (
	testAK = "HPUAEXAMPLEAK0000001"
	testSK = "exampleSecretKey0000000000000000000000000"
)

var testNow = time.Date(2025, 3, 14, 9, 26, 53, 0, time.UTC)

// signedStop builds a stop request signed at signedAt as the worker would
// send it; mutate may change it before signing.
func signedStop(t *testing.T, base, script, instance, ak, sk string, signedAt time.Time, mutate func(*http.Request)) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, base+stopPath("proj", script, instance), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set(HeaderProjectID, "proj")
	req.Header.Set("Content-Type", "application/json")
	if mutate != nil {
		mutate(req)
	}
	if err := dlf.SignRequest(req, nil, ak, sk, signedAt); err != nil {
		t.Fatal(err)
	}
	return req
}

func TestSignature(t *testing.T) {
	e, base := StartForTest(t, WithCredentials(testAK, testSK), WithClock(func() time.Time { return testNow }))
	c := newClient(t)
	unicode := "报表_ß.v2"
	for _, tc := range []struct {
		name     string
		script   string
		ak, sk   string
		signedAt time.Time
		before   func(*http.Request) // before signing
		after    func(*http.Request) // after signing
		want     int
	}{
		{name: "valid", want: http.StatusNoContent},
		{name: "valid unicode script", script: unicode, want: http.StatusNoContent},
		{name: "valid with workspace and signed host", before: func(r *http.Request) {
			r.Header.Set(HeaderWorkspace, "ws")
			r.Header.Set("Host", r.URL.Host)
		}, want: http.StatusNoContent},
		{name: "14 min fast clock", signedAt: testNow.Add(14 * time.Minute), want: http.StatusNoContent},
		{name: "14 min slow clock", signedAt: testNow.Add(-14 * time.Minute), want: http.StatusNoContent},
		{name: "16 min slow clock", signedAt: testNow.Add(-16 * time.Minute), want: http.StatusUnauthorized},
		{name: "16 min fast clock", signedAt: testNow.Add(16 * time.Minute), want: http.StatusUnauthorized},
		{name: "wrong sk", sk: testSK + "x", want: http.StatusUnauthorized},
		{name: "unknown ak", ak: "OTHERAK", want: http.StatusUnauthorized},
		{name: "no project id", before: func(r *http.Request) { r.Header.Del(HeaderProjectID) }, want: http.StatusUnauthorized},
		{name: "unsigned", after: func(r *http.Request) { r.Header.Del(dlf.HeaderAuthorization) }, want: http.StatusUnauthorized},
		{name: "signed header changed", before: func(r *http.Request) { r.Header.Set(HeaderWorkspace, "ws") },
			after: func(r *http.Request) { r.Header.Set(HeaderWorkspace, "other") }, want: http.StatusUnauthorized},
		{name: "path changed", after: func(r *http.Request) {
			r.URL.Path = strings.Replace(r.URL.Path, "/instances/", "/instances/x", 1)
		}, want: http.StatusUnauthorized},
		{name: "token instead", after: func(r *http.Request) {
			r.Header.Del(dlf.HeaderAuthorization)
			r.Header.Set(HeaderAuthToken, "tok")
		}, want: http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := tc.script
			if script == "" {
				script = "s"
			}
			ak, sk, at := tc.ak, tc.sk, tc.signedAt
			if ak == "" {
				ak = testAK
			}
			if sk == "" {
				sk = testSK
			}
			if at.IsZero() {
				at = testNow
			}
			id := e.Execute("proj", "", script)
			if tc.name == "valid with workspace and signed host" {
				id = e.Execute("proj", "ws", script)
			}
			req := signedStop(t, base, script, id, ak, sk, at, tc.before)
			if tc.after != nil {
				tc.after(req)
			}
			a, err := do(c, req)
			if err != nil {
				t.Fatal(err)
			}
			wantStatus(t, a, tc.want)
			if tc.want == http.StatusUnauthorized {
				if code := a.errorCode(t); code != CodeAuth {
					t.Fatalf("code %q", code)
				}
				if !strings.Contains(string(a.body), "Incorrect IAM authentication information") {
					t.Fatalf("body %s", a.body)
				}
				if strings.Contains(string(a.body), sk) {
					t.Fatal("secret key in the answer")
				}
				// The gateway's documented answer to an AK it does not
				// know names the AK; to any other failure, not.
				if named := strings.Contains(string(a.body), "Get secretKey failed,ak:"+ak+",err:ak not exist"); named != (tc.name == "unknown ak") {
					t.Fatalf("body %s", a.body)
				}
				if e.Stopped("proj", script, id) {
					t.Fatal("refused request stopped the instance")
				}
			}
		})
	}

	// Unsigned execute and query are refused as well.
	a := mustSend(t, c, http.MethodPost, base+executePath("proj", "s"), map[string]string{HeaderProjectID: "proj"})
	wantStatus(t, a, http.StatusUnauthorized)
	a = mustSend(t, c, http.MethodGet, base+queryPath("proj", "s", "i"), nil)
	wantStatus(t, a, http.StatusUnauthorized)
}

func TestTemporaryCredentials(t *testing.T) {
	e, base := StartForTest(t, WithTemporaryCredentials(testAK, testSK, "sts-token"))
	c := newClient(t)
	for _, tc := range []struct {
		name, token string
		want        int
	}{
		{"missing security token", "", http.StatusUnauthorized},
		{"wrong security token", "other", http.StatusUnauthorized},
		{"right security token", "sts-token", http.StatusNoContent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := e.Execute("proj", "", "s")
			req := signedStop(t, base, "s", id, testAK, testSK, time.Now(), func(r *http.Request) {
				if tc.token != "" {
					r.Header.Set(HeaderSecurityToken, tc.token)
				}
			})
			a, err := do(c, req)
			if err != nil {
				t.Fatal(err)
			}
			wantStatus(t, a, tc.want)
		})
	}
}

func TestCredentialRotation(t *testing.T) {
	e, base := StartForTest(t, WithCredentials(testAK, testSK))
	c := newClient(t)
	stop := func(ak, sk string) int {
		t.Helper()
		id := e.Execute("proj", "", "s")
		a, err := do(c, signedStop(t, base, "s", id, ak, sk, time.Now(), nil))
		if err != nil {
			t.Fatal(err)
		}
		return a.status
	}
	if got := stop(testAK, testSK); got != http.StatusNoContent {
		t.Fatalf("before rotation: %d", got)
	}
	e.SetCredentials("NEWAK", "newsk")
	if got := stop(testAK, testSK); got != http.StatusUnauthorized {
		t.Fatalf("old pair after rotation: %d", got)
	}
	if got := stop("NEWAK", "newsk"); got != http.StatusNoContent {
		t.Fatalf("new pair after rotation: %d", got)
	}
	e.SetCredentials("", "")
	id := e.Execute("proj", "", "s")
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("proj", "s", id), nil), http.StatusNoContent)
}

func TestAuthToken(t *testing.T) {
	e, base := StartForTest(t, WithAuthToken("good-token"))
	c := newClient(t)
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		want int
	}{
		{"right token", map[string]string{HeaderAuthToken: "good-token"}, http.StatusNoContent},
		{"wrong token", map[string]string{HeaderAuthToken: "bad-token"}, http.StatusUnauthorized},
		{"no token", nil, http.StatusUnauthorized},
		{"signature while AK/SK is off", map[string]string{dlf.HeaderAuthorization: "SDK-HMAC-SHA256 Access=a, SignedHeaders=x-sdk-date, Signature=00"}, http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := e.Execute("proj", "", "s")
			a := mustSend(t, c, http.MethodPost, base+stopPath("proj", "s", id), tc.hdr)
			wantStatus(t, a, tc.want)
			if tc.want == http.StatusUnauthorized && a.errorCode(t) != CodeAuth {
				t.Fatalf("body %s", a.body)
			}
		})
	}
	// Token changes at runtime.
	e.SetAuthToken("next-token")
	id := e.Execute("proj", "", "s")
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("proj", "s", id), map[string]string{HeaderAuthToken: "good-token"}), http.StatusUnauthorized)
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("proj", "s", id), map[string]string{HeaderAuthToken: "next-token"}), http.StatusNoContent)
}

func TestTokenOrSignature(t *testing.T) {
	e, base := StartForTest(t, WithAuthToken("tok"), WithCredentials(testAK, testSK))
	c := newClient(t)
	id := e.Execute("proj", "", "s")
	wantStatus(t, mustSend(t, c, http.MethodPost, base+stopPath("proj", "s", id), map[string]string{HeaderAuthToken: "tok"}), http.StatusNoContent)
	id = e.Execute("proj", "", "s")
	a, err := do(c, signedStop(t, base, "s", id, testAK, testSK, time.Now(), nil))
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, a, http.StatusNoContent)
}

// TestSignedPathEscaping pins that the path the emulator verifies is the
// decoded one: a request escaped differently from the canonical form (but
// meaning the same path) still verifies.
func TestSignedPathEscaping(t *testing.T) {
	e, base := StartForTest(t, WithCredentials(testAK, testSK))
	id := e.Execute("proj", "", "a~b")
	req := signedStop(t, base, "a~b", id, testAK, testSK, time.Now(), nil)
	u, _ := url.Parse(base + "/v1/proj/scripts/a%7Eb/instances/" + id + "/stop")
	req.URL = u
	a, err := do(newClient(t), req)
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, a, http.StatusNoContent)
}
