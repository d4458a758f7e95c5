package emulator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	_ TB = (*testing.T)(nil)
	_ TB = (*testing.B)(nil)
)

// ---- helpers ----

type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a answer) errorCode(t *testing.T) string {
	t.Helper()
	var b errorBody
	if err := json.Unmarshal(a.body, &b); err != nil {
		t.Fatalf("error body %q: %v", a.body, err)
	}
	if b.Msg == "" {
		t.Fatalf("error body %q has no error_msg", a.body)
	}
	return b.Code
}

func newClient(t testing.TB) *http.Client {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func stopPath(project, script, instance string) string {
	return queryPath(project, script, instance) + "/stop"
}

func queryPath(project, script, instance string) string {
	return "/v1/" + dlf.EscapePathSegment(project) + "/scripts/" + dlf.EscapePathSegment(script) +
		"/instances/" + dlf.EscapePathSegment(instance)
}

func executePath(project, script string) string {
	return "/v1/" + dlf.EscapePathSegment(project) + "/scripts/" + dlf.EscapePathSegment(script) + "/execute"
}

// send makes one request; hdr values are set as given.
func send(c *http.Client, method, url string, hdr map[string]string) (answer, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return answer{}, err
	}
	for k, v := range hdr {
		req.Header[k] = []string{v}
	}
	return do(c, req)
}

func do(c *http.Client, req *http.Request) (answer, error) {
	resp, err := c.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return answer{status: resp.StatusCode, header: resp.Header, body: b}, err
}

func mustSend(t *testing.T, c *http.Client, method, url string, hdr map[string]string) answer {
	t.Helper()
	a, err := send(c, method, url, hdr)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return a
}

func wantStatus(t *testing.T, a answer, want int) {
	t.Helper()
	if a.status != want {
		t.Fatalf("status %d, want %d (body %q)", a.status, want, a.body)
	}
	if a.header.Get(HeaderRequestID) == "" {
		t.Fatalf("answer %d has no %s", a.status, HeaderRequestID)
	}
}

// ---- routes and state ----

func TestExecuteQueryStop(t *testing.T) {
	e, url := StartForTest(t)
	c := newClient(t)
	ws := map[string]string{HeaderWorkspace: "ws1"}

	a := mustSend(t, c, http.MethodPost, url+executePath("p1", "daily"), ws)
	wantStatus(t, a, http.StatusOK)
	var ex struct {
		InstanceID string `json:"instanceId"`
	}
	if err := json.Unmarshal(a.body, &ex); err != nil || ex.InstanceID == "" {
		t.Fatalf("execute body %q: %v", a.body, err)
	}
	if st, ok := e.Status("p1", "daily", ex.InstanceID); !ok || st != StatusRunning {
		t.Fatalf("Status = %q, %v; want RUNNING", st, ok)
	}

	a = mustSend(t, c, http.MethodGet, url+queryPath("p1", "daily", ex.InstanceID), ws)
	wantStatus(t, a, http.StatusOK)
	if string(a.body) != `{"status":"RUNNING","results":[]}` {
		t.Fatalf("query body %s", a.body)
	}

	a = mustSend(t, c, http.MethodPost, url+stopPath("p1", "daily", ex.InstanceID), ws)
	wantStatus(t, a, http.StatusNoContent)
	if len(a.body) != 0 {
		t.Fatalf("204 with body %q", a.body)
	}
	if !e.Stopped("p1", "daily", ex.InstanceID) {
		t.Fatal("instance not stopped")
	}

	a = mustSend(t, c, http.MethodGet, url+queryPath("p1", "daily", ex.InstanceID), ws)
	wantStatus(t, a, http.StatusOK)
	if want := `{"status":"` + StatusStopped + `","results":[]}`; string(a.body) != want {
		t.Fatalf("query after stop: %s, want %s", a.body, want)
	}

	// Stopping twice: the second finds no running instance.
	a = mustSend(t, c, http.MethodPost, url+stopPath("p1", "daily", ex.InstanceID), ws)
	wantStatus(t, a, http.StatusBadRequest)
	if code := a.errorCode(t); code != CodeInstanceNotFound {
		t.Fatalf("second stop code %q", code)
	}
	if got := e.StopCalls(); got != 2 {
		t.Fatalf("StopCalls = %d, want 2", got)
	}
	if got := e.StopCallsFor("p1", "daily", ex.InstanceID); got != 2 {
		t.Fatalf("StopCallsFor = %d, want 2", got)
	}
}

func TestQueryUnknownInstance(t *testing.T) {
	_, url := StartForTest(t)
	a := mustSend(t, newClient(t), http.MethodGet, url+queryPath("p", "s", "nope"), nil)
	wantStatus(t, a, http.StatusBadRequest)
	if code := a.errorCode(t); code != CodeInstanceNotFound {
		t.Fatalf("code %q", code)
	}
}

func TestStopByStatus(t *testing.T) {
	e, url := StartForTest(t)
	c := newClient(t)
	for _, tc := range []struct {
		status string
		want   int
	}{
		{StatusRunning, http.StatusNoContent},
		{StatusLaunching, http.StatusNoContent},
		{StatusFinished, http.StatusBadRequest},
		{StatusFailed, http.StatusBadRequest},
	} {
		t.Run(tc.status, func(t *testing.T) {
			id := "i-" + strings.ToLower(tc.status)
			e.AddRunning("p", "", "s", id)
			e.SetStatus("p", "s", id, tc.status)
			a := mustSend(t, c, http.MethodPost, url+stopPath("p", "s", id), nil)
			wantStatus(t, a, tc.want)
			if got := e.Stopped("p", "s", id); got != (tc.want == http.StatusNoContent) {
				t.Fatalf("Stopped = %v", got)
			}
		})
	}
	// SetStatus on an unknown instance creates it in the default workspace.
	e.SetStatus("p", "s", "fresh", StatusRunning)
	wantStatus(t, mustSend(t, c, http.MethodPost, url+stopPath("p", "s", "fresh"), nil), http.StatusNoContent)
	if _, ok := e.Status("p", "s", "missing"); ok {
		t.Fatal("Status reports an instance that was never created")
	}
}

func TestWorkspace(t *testing.T) {
	e, url := StartForTest(t)
	c := newClient(t)
	e.AddRunning("p", "ws1", "s", "in-ws1")
	e.AddRunning("p", "", "s", "in-default")
	for _, tc := range []struct {
		name, project, instance, workspace string
		want                               int
	}{
		{"no header for ws1 instance", "p", "in-ws1", "", http.StatusBadRequest},
		{"other workspace", "p", "in-ws1", "ws2", http.StatusBadRequest},
		{"default instance with ws1 header", "p", "in-default", "ws1", http.StatusBadRequest},
		{"other project", "q", "in-ws1", "ws1", http.StatusBadRequest},
		{"right workspace", "p", "in-ws1", "ws1", http.StatusNoContent},
		{"default workspace", "p", "in-default", "", http.StatusNoContent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr map[string]string
			if tc.workspace != "" {
				hdr = map[string]string{HeaderWorkspace: tc.workspace}
			}
			// The query route applies the same rule.
			q := mustSend(t, c, http.MethodGet, url+queryPath(tc.project, "s", tc.instance), hdr)
			if (q.status == http.StatusOK) != (tc.want == http.StatusNoContent) {
				t.Fatalf("query status %d", q.status)
			}
			a := mustSend(t, c, http.MethodPost, url+stopPath(tc.project, "s", tc.instance), hdr)
			wantStatus(t, a, tc.want)
			if tc.want == http.StatusBadRequest && a.errorCode(t) != CodeInstanceNotFound {
				t.Fatalf("body %s", a.body)
			}
		})
	}
}

func TestUnicodeScriptAndRecording(t *testing.T) {
	e, url := StartForTest(t)
	c := newClient(t)
	script := "日报_v1.2-Ölçüm"
	id := e.Execute("proj", "ws", script)
	req, _ := http.NewRequest(http.MethodPost, url+stopPath("proj", script, id), nil)
	req.Header.Set(HeaderWorkspace, "ws")
	req.Header.Set("Content-Type", "application/json")
	a, err := do(c, req)
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, a, http.StatusNoContent)
	if !e.Stopped("proj", script, id) {
		t.Fatal("unicode script instance not stopped")
	}
	reqs := e.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests recorded", len(reqs))
	}
	r := reqs[0]
	wantPath := "/v1/proj/scripts/" + dlf.EscapePathSegment(script) + "/instances/" + id + "/stop"
	if r.Path != wantPath || r.RequestURI != wantPath {
		t.Fatalf("recorded path %q / %q, want %q", r.Path, r.RequestURI, wantPath)
	}
	if r.Method != http.MethodPost || r.Script != script || r.Project != "proj" || r.InstanceID != id ||
		r.Workspace != "ws" || r.Status != http.StatusNoContent || !r.Applied || r.Fault != "" ||
		len(r.Body) != 0 || r.Header.Get("Content-Type") != "application/json" ||
		r.RequestID != a.header.Get(HeaderRequestID) || r.Time.IsZero() {
		t.Fatalf("recorded %+v", r)
	}
}

func TestUnknownRoutes(t *testing.T) {
	_, url := StartForTest(t)
	c := newClient(t)
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/"},
		{http.MethodGet, "/v1/p/scripts/s/instances/i/stop"},
		{http.MethodPut, "/v1/p/scripts/s/instances/i/stop"},
		{http.MethodPost, "/v1/p/scripts/s/instances/i/stop/"},
		{http.MethodPost, "/v2/p/scripts/s/instances/i/stop"},
		{http.MethodPost, "/v1/p/jobs/s/instances/i/stop"},
		{http.MethodPost, "/v1//scripts/s/instances/i/stop"},
		{http.MethodPost, "/v1/p/scripts/s/instances//stop"},
		{http.MethodDelete, "/v1/p/scripts/s/instances/i"},
		{http.MethodGet, "/v1/p/scripts/s/execute"},
		{http.MethodPost, "/v1/p/scripts/s/instances/i/stop/x"},
	} {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			a := mustSend(t, c, tc.method, url+tc.path, nil)
			wantStatus(t, a, http.StatusNotFound)
			if code := a.errorCode(t); code != CodeNoSuchAPI {
				t.Fatalf("code %q", code)
			}
		})
	}
}

func TestParseRoute(t *testing.T) {
	for _, tc := range []struct {
		method, path string
		ok           bool
		want         route
	}{
		{"POST", "/v1/p/scripts/a%2Fb/instances/i/stop", true, route{routeStop, "p", "a/b", "i"}},
		{"POST", "/v1/p/scripts/%E6%97%A5/execute", true, route{routeExecute, "p", "日", ""}},
		{"GET", "/v1/p/scripts/s/instances/i%2D1", true, route{routeQuery, "p", "s", "i-1"}},
		{"POST", "/v1/p/scripts/%ZZ/instances/i/stop", false, route{}},
		{"POST", "/v1/%/scripts/s/instances/i/stop", false, route{}},
		{"POST", "/v1/p/scripts/s/instances/i/stop?x=1", false, route{}},
		{"POST", "v1/p/scripts/s/instances/i/stop", false, route{}},
	} {
		got, ok := parseRoute(tc.method, tc.path)
		if ok != tc.ok || got != tc.want {
			t.Errorf("parseRoute(%s %s) = %+v, %v; want %+v, %v", tc.method, tc.path, got, ok, tc.want, tc.ok)
		}
	}
}

func TestRequestLogRing(t *testing.T) {
	e, url := StartForTest(t, WithRequestLogSize(3))
	c := newClient(t)
	for i := range 5 {
		mustSend(t, c, http.MethodPost, url+stopPath("p", "s", fmt.Sprint("i", i)), nil)
	}
	reqs := e.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d requests kept, want 3", len(reqs))
	}
	for j, r := range reqs {
		if want := fmt.Sprint("i", j+2); r.InstanceID != want || r.Status != http.StatusBadRequest {
			t.Fatalf("request %d: %+v, want instance %s", j, r, want)
		}
	}

	off, url2 := StartForTest(t, WithRequestLogSize(0))
	mustSend(t, c, http.MethodPost, url2+stopPath("p", "s", "i"), nil)
	if got := off.Requests(); got != nil {
		t.Fatalf("log disabled but got %d", len(got))
	}
	if off.StopCalls() != 1 {
		t.Fatal("calls not counted with the log disabled")
	}
}

func TestRequestIDsUnique(t *testing.T) {
	var g requestIDs
	g.init()
	seen := make(map[string]bool)
	for range 100000 {
		id := g.next()
		if len(id) != 32 || seen[id] {
			t.Fatalf("id %q: len %d, duplicate %v", id, len(id), seen[id])
		}
		seen[id] = true
	}
	if a, b := newInstanceID(), newInstanceID(); a == b || len(a) != 36 {
		t.Fatalf("instance ids %q %q", a, b)
	}
}

func TestHandlerWithOwnServer(t *testing.T) {
	e := New()
	srv := httptest.NewServer(e.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(func() { _ = e.Close() })
	c := newClient(t)
	id := e.Execute("p", "", "s")
	wantStatus(t, mustSend(t, c, http.MethodPost, srv.URL+stopPath("p", "s", id), nil), http.StatusNoContent)

	// Without a listener of its own, Down closes each connection.
	e.SetFaults(Faults{Down: true})
	if _, err := send(c, http.MethodPost, srv.URL+stopPath("p", "s", id), nil); err == nil {
		t.Fatal("request answered while Down")
	}
	e.SetFaults(Faults{})
	wantStatus(t, mustSend(t, c, http.MethodPost, srv.URL+stopPath("p", "s", id), nil), http.StatusBadRequest)
}

func TestLifecycle(t *testing.T) {
	e := New()
	if e.URL() != "" {
		t.Fatal("URL before Start")
	}
	url, err := e.Start()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(url, "http://127.0.0.1:") || e.URL() != url {
		t.Fatalf("url %q, URL() %q", url, e.URL())
	}
	if _, err := e.Start(); err == nil {
		t.Fatal("second Start succeeded")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := e.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
	if _, err := New().StartOn("256.0.0.1:1"); err == nil {
		t.Fatal("StartOn a bad address succeeded")
	}
	// State stays readable after Close; requests are refused.
	e.AddRunning("p", "", "s", "i")
	if st, _ := e.Status("p", "s", "i"); st != StatusRunning {
		t.Fatal("state unusable after Close")
	}
	if _, err := send(newClient(t), http.MethodPost, url+stopPath("p", "s", "i"), nil); err == nil {
		t.Fatal("closed emulator answered")
	}
}

func TestCloseLeaksNothing(t *testing.T) {
	e := New(WithLogger(nil))
	url, err := e.Start()
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t)
	id := e.Execute("p", "", "s")
	// An idle keep-alive connection, a hanging request and a slow one.
	wantStatus(t, mustSend(t, c, http.MethodGet, url+queryPath("p", "s", id), nil), http.StatusOK)
	e.SetFaultsFor("p", "s", "hang", Faults{Hang: true})
	e.SetFaultsFor("p", "s", "slow", Faults{Latency: time.Hour})
	errs := make(chan error, 2)
	for _, inst := range []string{"hang", "slow"} {
		go func() {
			_, err := send(&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}, http.MethodPost, url+stopPath("p", "s", inst), nil)
			errs <- err
		}()
	}
	testutil.WaitFor(t, 5*time.Second, "both requests to arrive", func() bool { return e.StopCalls() == 2 })
	// A Down/up cycle too.
	e.SetFaults(Faults{Down: true})
	e.SetFaults(Faults{})

	start := time.Now()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Close took %s", d)
	}
	for range 2 {
		if err := <-errs; err == nil {
			t.Fatal("a request waiting in the emulator got an answer after Close")
		}
	}
	c.CloseIdleConnections()
	goleak.VerifyNone(t)
}

func TestConcurrency(t *testing.T) {
	e, url := StartForTest(t)
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	const workers, perWorker = 16, 25

	var ids sync.Map // request id -> true
	stopFlip := make(chan struct{})
	flipDone := make(chan struct{})
	go func() { // faults change and observers read while requests run
		defer close(flipDone)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stopFlip:
				return
			case <-tick.C:
			}
			e.SetFaults(Faults{Latency: time.Duration(i%2) * time.Millisecond})
			_ = e.Requests()
			_ = e.StopCalls()
		}
	}()

	var wg sync.WaitGroup
	errs := make(chan error, workers)
	made := make(chan [2]string, workers*perWorker)
	for w := range workers {
		wg.Go(func() {
			ws := fmt.Sprint("ws", w%3)
			hdr := map[string]string{HeaderWorkspace: ws}
			for i := range perWorker {
				script := fmt.Sprint("script-", w, "-", i%5)
				a, err := send(c, http.MethodPost, url+executePath("p", script), hdr)
				if err != nil || a.status != http.StatusOK {
					errs <- fmt.Errorf("execute: %v %d", err, a.status)
					return
				}
				var ex struct{ InstanceID string }
				_ = json.Unmarshal(a.body, &ex)
				made <- [2]string{script, ex.InstanceID}
				for j, want := range []int{http.StatusOK, http.StatusNoContent, http.StatusBadRequest} {
					method, path := http.MethodPost, stopPath("p", script, ex.InstanceID)
					if j == 0 {
						method, path = http.MethodGet, queryPath("p", script, ex.InstanceID)
					}
					a, err := send(c, method, url+path, hdr)
					if err != nil || a.status != want {
						errs <- fmt.Errorf("%s %s: %v %d, want %d", method, path, err, a.status, want)
						return
					}
					rid := a.header.Get(HeaderRequestID)
					if _, dup := ids.LoadOrStore(rid, true); dup {
						errs <- fmt.Errorf("duplicate request id %s", rid)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(stopFlip)
	<-flipDone
	close(errs)
	close(made)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	if got, want := e.StopCalls(), int64(2*workers*perWorker); got != want {
		t.Fatalf("StopCalls = %d, want %d", got, want)
	}
	for m := range made {
		if !e.Stopped("p", m[0], m[1]) || e.StopCallsFor("p", m[0], m[1]) != 2 {
			t.Fatalf("instance %v: stopped %v, calls %d", m, e.Stopped("p", m[0], m[1]), e.StopCallsFor("p", m[0], m[1]))
		}
	}
	if n := len(e.Requests()); n != 2*workers*perWorker {
		t.Fatalf("%d requests recorded", n)
	}
}

func TestStartForTestClosesOnCleanup(t *testing.T) {
	var e *Emulator
	var url string
	t.Run("inner", func(t *testing.T) { e, url = StartForTest(t) })
	if _, err := send(newClient(t), http.MethodGet, url+queryPath("p", "s", "i"), nil); err == nil {
		t.Fatal("emulator still serving after its test's cleanup")
	}
	_ = e
}

func BenchmarkStop(b *testing.B) {
	e, url := StartForTest(b, WithRequestLogSize(1024))
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	b.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		buf := new(bytes.Buffer)
		for pb.Next() {
			id := e.Execute("p", "", "s")
			resp, err := c.Post(url+stopPath("p", "s", id), "application/json", nil)
			if err != nil {
				b.Error(err)
				return
			}
			buf.Reset()
			_, _ = buf.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusNoContent {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}
