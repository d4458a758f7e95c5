package dlf

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testStop = StopRequest{ProjectID: "proj-1", Workspace: "ws-1", ScriptName: "数据清洗_v1.2", InstanceID: "inst-1"}

func keyCreds() Credentials { return Credentials{AK: testAK, SK: testSK} }

// setup starts an httptest server running h and a client for it; both are
// closed when the test ends.
func setup(t *testing.T, h http.HandlerFunc, cfg Config, opts ...Option) (*Client, *httptest.Server) {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	cfg.Endpoint = srv.URL
	c, err := NewClient(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c, srv
}

func staticCreds(cr Credentials) func() Credentials { return func() Credentials { return cr } }

// verifyOnServer checks the request's signature as the gateway would.
func verifyOnServer(r *http.Request) error {
	body, _ := io.ReadAll(r.Body)
	keys := map[string]string{testAK: testSK, testAK2: testSK2}
	return VerifyRequest(r, body, func(ak string) (string, bool) { sk, ok := keys[ak]; return sk, ok }, time.Now(), 15*time.Minute)
}

func TestStopSuccess(t *testing.T) {
	var got *http.Request
	var verifyErr error
	var contentLength int64
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		got = r.Clone(context.Background())
		contentLength = r.ContentLength
		verifyErr = verifyOnServer(r)
		w.Header().Set("X-Request-Id", "req-204")
		w.WriteHeader(http.StatusNoContent)
	}, Config{Credentials: staticCreds(keyCreds()), UserAgent: "test-agent/1"})

	resp, err := c.Stop(context.Background(), testStop)
	if err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if resp.StatusCode != 204 || resp.RequestID != "req-204" {
		t.Errorf("response %+v", resp)
	}
	if verifyErr != nil {
		t.Errorf("server refused the signature: %v", verifyErr)
	}
	if got.Method != "POST" {
		t.Errorf("method %s", got.Method)
	}
	wantURI := "/v1/proj-1/scripts/%E6%95%B0%E6%8D%AE%E6%B8%85%E6%B4%97_v1.2/instances/inst-1/stop"
	if got.RequestURI != wantURI {
		t.Errorf("wire path %s, want %s", got.RequestURI, wantURI)
	}
	for k, want := range map[string]string{
		"X-Project-Id": "proj-1",
		"Content-Type": "application/json",
		"Workspace":    "ws-1",
		"User-Agent":   "test-agent/1",
	} {
		if v := got.Header.Get(k); v != want {
			t.Errorf("header %s = %q, want %q", k, v, want)
		}
	}
	if contentLength != 0 {
		t.Errorf("content length %d", contentLength)
	}
	auth := got.Header.Get("Authorization")
	if !strings.Contains(auth, "SignedHeaders=workspace;x-project-id;x-sdk-date,") {
		t.Errorf("signed headers: %s", auth)
	}
}

func TestStopWirePathIsCanonicalURI(t *testing.T) {
	type seen struct {
		uri string
		err error
	}
	ch := make(chan seen, 1)
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		ch <- seen{r.RequestURI, verifyOnServer(r)}
		w.WriteHeader(http.StatusNoContent)
	}, Config{})
	for _, tc := range sdkStopCases() {
		c.creds = staticCreds(tc.creds)
		if _, err := c.Stop(context.Background(), tc.req); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		s := <-ch
		path := "/v1/" + tc.req.ProjectID + "/scripts/" + tc.req.ScriptName + "/instances/" + tc.req.InstanceID + "/stop"
		if want := strings.TrimSuffix(CanonicalURI(path), "/"); s.uri != want {
			t.Errorf("%s: wire %s, want %s", tc.name, s.uri, want)
		}
		if s.err != nil {
			t.Errorf("%s: server refused the signature: %v", tc.name, s.err)
		}
	}
}

// Characters Go's own path escaping leaves as they are (sub-delimiters,
// ':' and '@') are escaped on the wire as they are signed: the expected
// paths are written out here, not computed with CanonicalURI (found by
// review: with the client's escaping removed, every test still passed).
func TestStopWirePathEscapesReservedCharacters(t *testing.T) {
	ch := make(chan string, 1)
	errs := make(chan error, 1)
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		ch <- r.RequestURI
		errs <- verifyOnServer(r)
		w.WriteHeader(http.StatusNoContent)
	}, Config{})
	c.creds = staticCreds(Credentials{AK: testAK, SK: testSK})
	for _, tc := range []struct {
		script, instance, want string
	}{
		{"a+b&c=d:e@f", "i-1", "/v1/proj-1/scripts/a%2Bb%26c%3Dd%3Ae%40f/instances/i-1/stop"},
		{"a b", "50% ~x", "/v1/proj-1/scripts/a%20b/instances/50%25%20~x/stop"},
		{"s!$'()*,;", "i", "/v1/proj-1/scripts/s%21%24%27%28%29%2A%2C%3B/instances/i/stop"},
	} {
		if _, err := c.Stop(context.Background(), StopRequest{ProjectID: "proj-1", ScriptName: tc.script, InstanceID: tc.instance}); err != nil {
			t.Fatalf("%q: %v", tc.script, err)
		}
		if got := <-ch; got != tc.want {
			t.Errorf("%q %q: wire %s, want %s", tc.script, tc.instance, got, tc.want)
		}
		if err := <-errs; err != nil {
			t.Errorf("%q: server refused the signature: %v", tc.script, err)
		}
	}
}

func TestStopHeaders(t *testing.T) {
	tests := []struct {
		name     string
		creds    func() Credentials
		req      StopRequest
		want     map[string]string // "" = must be absent
		verifies bool
	}{
		{
			name:     "workspace present",
			creds:    staticCreds(keyCreds()),
			req:      testStop,
			want:     map[string]string{"Workspace": "ws-1", "X-Auth-Token": "", "X-Security-Token": ""},
			verifies: true,
		},
		{
			name:     "workspace absent",
			creds:    staticCreds(keyCreds()),
			req:      StopRequest{ProjectID: "p", ScriptName: "s", InstanceID: "i"},
			want:     map[string]string{"Workspace": ""},
			verifies: true,
		},
		{
			name:     "security token",
			creds:    staticCreds(Credentials{AK: testAK, SK: testSK, SecurityToken: testToken}),
			req:      testStop,
			want:     map[string]string{"X-Security-Token": testToken},
			verifies: true,
		},
		{
			name:  "auth token",
			creds: staticCreds(Credentials{AuthToken: "iam-token-value-0123456789"}),
			req:   testStop,
			want:  map[string]string{"X-Auth-Token": "iam-token-value-0123456789", "Authorization": "", "X-Sdk-Date": "", "X-Project-Id": "proj-1"},
		},
		{
			name:  "unauthenticated",
			creds: nil,
			req:   testStop,
			want:  map[string]string{"Authorization": "", "X-Auth-Token": "", "X-Sdk-Date": ""},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var h http.Header
			var verifyErr error
			c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
				h = r.Header.Clone()
				verifyErr = verifyOnServer(r)
				w.WriteHeader(http.StatusNoContent)
			}, Config{Credentials: tc.creds})
			if _, err := c.Stop(context.Background(), tc.req); err != nil {
				t.Fatal(err)
			}
			for k, want := range tc.want {
				if got := h.Get(k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
			if tc.verifies && verifyErr != nil {
				t.Errorf("signature refused: %v", verifyErr)
			}
			if tc.want["X-Security-Token"] != "" && !strings.Contains(h.Get("Authorization"), "x-security-token") {
				t.Errorf("security token not signed: %s", h.Get("Authorization"))
			}
		})
	}
}

func TestStopCallsCredentialsEveryTime(t *testing.T) {
	var n atomic.Int32
	creds := func() Credentials {
		if n.Add(1) == 1 {
			return Credentials{AK: testAK, SK: testSK}
		}
		return Credentials{AK: testAK2, SK: testSK2}
	}
	var seen []string
	var mu sync.Mutex
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		if err := verifyOnServer(r); err != nil {
			t.Errorf("refused: %v", err)
		}
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}, Config{Credentials: creds})
	for range 2 {
		if _, err := c.Stop(context.Background(), testStop); err != nil {
			t.Fatal(err)
		}
	}
	if len(seen) != 2 || !strings.Contains(seen[0], "Access="+testAK+",") || !strings.Contains(seen[1], "Access="+testAK2+",") {
		t.Errorf("rotated keys not used: %q", seen)
	}
}

func TestStopCredentialErrors(t *testing.T) {
	var calls atomic.Int32
	for _, cr := range []Credentials{
		{AK: testAK, SK: testSK, AuthToken: "tok-0123456789"},
		{AK: testAK},
		{SK: testSK},
		{},
		{SecurityToken: testToken},
		// Values that go into a header must be able to: a token file
		// wrapped at 76 columns keeps its inner line breaks.
		{AK: testAK, SK: testSK, SecurityToken: testToken[:8] + "\n" + testToken[8:]},
		{AK: testAK + "\r\n", SK: testSK},
		{AuthToken: "tok-0123\x00456789"},
	} {
		c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }, Config{Credentials: staticCreds(cr)})
		resp, err := c.Stop(context.Background(), testStop)
		if !errors.Is(err, ErrCredentials) || resp != nil {
			t.Errorf("%+v: got (%v, %v), want ErrCredentials", cr, resp, err)
		}
		if err != nil && (strings.Contains(err.Error(), testSK) || strings.Contains(err.Error(), testToken)) {
			t.Errorf("error holds a secret: %v", err)
		}
		if v := Classify(resp, err); v.Class != ClassRetry || !v.Systemic || !v.NotSent {
			t.Errorf("credential error classified %+v", v)
		}
	}
	if calls.Load() != 0 {
		t.Errorf("%d calls made with unusable credentials", calls.Load())
	}
}

func TestStopAPIError(t *testing.T) {
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Request-Id", "req-6205")
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"error_code":"DLF.6205","error_msg":"The script running history does not exist."}`)
	}, Config{Credentials: staticCreds(keyCreds())})

	resp, err := c.Stop(context.Background(), testStop)
	var apiErr *APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("err %v is not *APIError", err)
	}
	want := APIError{StatusCode: 400, ErrorCode: "DLF.6205", ErrorMsg: "The script running history does not exist.", RequestID: "req-6205"}
	if *apiErr != want {
		t.Errorf("got %+v, want %+v", *apiErr, want)
	}
	if resp == nil || resp.StatusCode != 400 || resp.RequestID != "req-6205" {
		t.Errorf("response %+v", resp)
	}
	if !errors.Is(err, ErrScriptInstanceNotFound) {
		t.Error("errors.Is(err, ErrScriptInstanceNotFound) is false")
	}
	if errors.Is(err, ErrScriptNotFound) {
		t.Error("errors.Is(err, ErrScriptNotFound) is true")
	}
	if s := err.Error(); s != "dlf: HTTP 400 DLF.6205: The script running history does not exist. (request id req-6205)" {
		t.Errorf("Error() = %q", s)
	}
	if v := Classify(resp, err); v.Class != ClassFailed || v.ErrorCode != "DLF.6205" || v.RequestID != "req-6205" || v.HTTPStatus != 400 {
		t.Errorf("classified %+v", v)
	}
}

func TestStopRedirectNotFollowed(t *testing.T) {
	var followed atomic.Int32
	c, srv := setup(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/elsewhere") {
			followed.Add(1)
			w.WriteHeader(http.StatusNoContent)
			return
		}
		w.Header().Set("Location", "/elsewhere")
		w.WriteHeader(http.StatusFound)
	}, Config{})
	resp, err := c.Stop(context.Background(), testStop)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 302 || resp == nil || resp.StatusCode != 302 {
		t.Fatalf("got (%+v, %v), want 302 answer", resp, err)
	}
	if followed.Load() != 0 {
		t.Error("redirect followed")
	}
	if v := Classify(resp, err); v.Class != ClassFailed || v.HTTPStatus != 302 {
		t.Errorf("classified %+v", v)
	}

	// A caller's client with its own redirect policy is not followed either,
	// and is left unchanged.
	own := &http.Client{}
	c2, err := NewClient(Config{Endpoint: srv.URL}, WithHTTPClient(own))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Stop(context.Background(), testStop); !errors.As(err, &apiErr) || apiErr.StatusCode != 302 {
		t.Fatalf("with own client: %v", err)
	}
	if own.CheckRedirect != nil || followed.Load() != 0 {
		t.Error("own client changed or redirect followed")
	}
	own.CloseIdleConnections()
}

func TestStopSwitchingProtocols(t *testing.T) {
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n")
		brw.Flush()
		io.Copy(io.Discard, conn) // until the client closes
	}, Config{Timeout: 5 * time.Second})
	start := time.Now()
	resp, err := c.Stop(context.Background(), testStop)
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 101 || resp.StatusCode != 101 {
		t.Fatalf("got (%+v, %v), want a 101 answer", resp, err)
	}
	if time.Since(start) > 2*time.Second {
		t.Error("waited for the body of a 101")
	}
	if v := Classify(resp, err); v.Class != ClassFailed {
		t.Errorf("classified %+v", v)
	}
}

func TestNewClientEndpoint(t *testing.T) {
	tests := []struct {
		endpoint string
		ok       bool
	}{
		{"https://dayu-dlf.cn-north-4.myhuaweicloud.com", true},
		{"https://dayu-dlf.cn-north-4.myhuaweicloud.com/", true},
		{"https://gw.example.com:8443/dlf-api", true},
		{"http://127.0.0.1:8080", true},
		{"http://127.1.2.3", true},
		{"http://[::1]:9000", true},
		{"http://localhost:9000", true},
		{"http://LocalHost", true},
		{"http://example.com", false},
		{"http://10.0.0.1:8080", false},
		{"http://[::2]:80", false},
		{"http://localhost.example.com", false},
		{"http://0.0.0.0:80", false},
		{"ftp://127.0.0.1", false},
		{"dayu-dlf.cn-north-4.myhuaweicloud.com", false},
		{"", false},
		{"https://user:secret@example.com", false},
		{"https://example.com?x=1", false},
		{"https://example.com#frag", false},
		{"https://example.com/a%20b", false},
		{"https://", false},
		{"https://:443", false},
		{"https://gw.example.com/a/../b", false},
		{"https://gw.example.com/a/./b", false},
		{"https://gw.example.com/a//b", false},
		{"https://gw.example.com/..", false},
		{"https://gw.example.com/v.1/dlf", true},
	}
	for _, tc := range tests {
		c, err := NewClient(Config{Endpoint: tc.endpoint})
		if tc.ok && err != nil {
			t.Errorf("%q refused: %v", tc.endpoint, err)
		}
		if !tc.ok && err == nil {
			t.Errorf("%q accepted", tc.endpoint)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("error holds userinfo: %v", err)
		}
		if c != nil {
			c.CloseIdleConnections()
		}
	}
	for _, cfg := range []Config{
		{Endpoint: "https://x", Timeout: -1},
		{Endpoint: "https://x", MaxConns: -1},
	} {
		if _, err := NewClient(cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

func TestNewClientDefaults(t *testing.T) {
	c, err := NewClient(Config{Endpoint: "https://x"})
	if err != nil {
		t.Fatal(err)
	}
	tr := c.hc.Transport.(*http.Transport)
	if c.timeout != DefaultTimeout || tr.MaxIdleConnsPerHost != DefaultMaxConns || tr.MaxConnsPerHost != DefaultMaxConns || c.ua != DefaultUserAgent {
		t.Errorf("defaults: timeout %s, idle/host %d, max/host %d, ua %q", c.timeout, tr.MaxIdleConnsPerHost, tr.MaxConnsPerHost, c.ua)
	}
	// Below the usual 60s idle timeout of load balancers (see idleConnTimeout).
	if tr.IdleConnTimeout <= 0 || tr.IdleConnTimeout >= 60*time.Second {
		t.Errorf("idle connections kept %s", tr.IdleConnTimeout)
	}
	c, err = NewClient(Config{Endpoint: "https://x", MaxConns: 7, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if tr := c.hc.Transport.(*http.Transport); tr.MaxIdleConnsPerHost != 7 || c.timeout != time.Second {
		t.Errorf("MaxConns/Timeout not applied")
	}
}

func TestStopEndpointWithPathPrefix(t *testing.T) {
	var uri string
	var verifyErr error
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uri, verifyErr = r.RequestURI, verifyOnServer(r)
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	c := newTestClient(t, Config{Endpoint: srv.URL + "/gw/dlf/", Credentials: staticCreds(keyCreds())})
	if _, err := c.Stop(context.Background(), StopRequest{ProjectID: "p", ScriptName: "s", InstanceID: "i"}); err != nil {
		t.Fatal(err)
	}
	if uri != "/gw/dlf/v1/p/scripts/s/instances/i/stop" || verifyErr != nil {
		t.Errorf("uri %s, verify %v", uri, verifyErr)
	}
}

func TestValidateStopRequest(t *testing.T) {
	ok := StopRequest{ProjectID: "p", ScriptName: "s", InstanceID: "i"}
	with := func(f func(*StopRequest)) StopRequest { r := ok; f(&r); return r }
	tests := []struct {
		name  string
		req   StopRequest
		valid bool
	}{
		{"minimal", ok, true},
		{"unicode script", with(func(r *StopRequest) { r.ScriptName = "数据.清洗_v-1" }), true},
		{"three dots", with(func(r *StopRequest) { r.ScriptName = "..." }), true},
		{"workspace", with(func(r *StopRequest) { r.Workspace = "ws" }), true},
		{"empty project", with(func(r *StopRequest) { r.ProjectID = "" }), false},
		{"empty script", with(func(r *StopRequest) { r.ScriptName = "" }), false},
		{"empty instance", with(func(r *StopRequest) { r.InstanceID = "" }), false},
		{"slash in script", with(func(r *StopRequest) { r.ScriptName = "a/b" }), false},
		{"slash in project", with(func(r *StopRequest) { r.ProjectID = "/" }), false},
		{"slash in instance", with(func(r *StopRequest) { r.InstanceID = "x/" }), false},
		{"dot script", with(func(r *StopRequest) { r.ScriptName = "." }), false},
		{"dot dot instance", with(func(r *StopRequest) { r.InstanceID = ".." }), false},
		{"newline", with(func(r *StopRequest) { r.ScriptName = "a\nb" }), false},
		{"nul", with(func(r *StopRequest) { r.InstanceID = "a\x00" }), false},
		{"del", with(func(r *StopRequest) { r.ProjectID = "a\x7f" }), false},
		{"c1 control", with(func(r *StopRequest) { r.ScriptName = "a\u0085" }), false},
		{"invalid utf8", with(func(r *StopRequest) { r.ScriptName = "a\xff" }), false},
		{"workspace crlf", with(func(r *StopRequest) { r.Workspace = "ws\r\nX-Evil: 1" }), false},
	}
	for _, tc := range tests {
		err := ValidateStopRequest(tc.req)
		if tc.valid && err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
		if !tc.valid && !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%s: got %v, want ErrInvalidRequest", tc.name, err)
		}
	}

	var calls atomic.Int32
	c, _ := setup(t, func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }, Config{})
	_, err := c.Stop(context.Background(), StopRequest{ProjectID: "p", ScriptName: "..", InstanceID: "i"})
	if !errors.Is(err, ErrInvalidRequest) || calls.Load() != 0 {
		t.Errorf("invalid request: %v, %d calls", err, calls.Load())
	}
	if v := Classify(nil, err); v.Class != ClassFailed {
		t.Errorf("invalid request classified %+v", v)
	}
}

func TestEndpointForRegion(t *testing.T) {
	if got := EndpointForRegion("cn-north-4"); got != "https://dayu-dlf.cn-north-4.myhuaweicloud.com" {
		t.Errorf("got %s", got)
	}
	if _, err := NewClient(Config{Endpoint: EndpointForRegion("ap-southeast-1")}); err != nil {
		t.Error(err)
	}
}

func BenchmarkStop(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	c, err := NewClient(Config{Endpoint: srv.URL, Credentials: staticCreds(Credentials{AK: testAK, SK: testSK, SecurityToken: testToken}), MaxConns: 64})
	if err != nil {
		b.Fatal(err)
	}
	defer c.CloseIdleConnections()
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Stop(ctx, testStop); err != nil {
				b.Fatal(err)
			}
		}
	})
}
