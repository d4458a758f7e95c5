package emulator

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Error codes the emulator answers with.
const (
	// CodeInstanceNotFound is DLF's "The script execution instance does not
	// exist." (dataartsstudio_02_0313).
	CodeInstanceNotFound = "DLF.6205"
	// CodeAuth is the API gateway's "Incorrect IAM authentication
	// information", 401.
	CodeAuth = "APIG.0301"
	// CodeThrottled is the API gateway's throttling code, 429.
	CodeThrottled = "APIG.0308"
	// CodeNoSuchAPI answers unknown routes, 404: an API gateway code that
	// dlf-api-facts.md does not list (our assumption).
	CodeNoSuchAPI = "APIG.0101"
	// CodeFaultPrefix starts the error_code of answers injected by
	// Faults.ErrorRate ("EMU.503"): emulator-only, never sent by DLF.
	CodeFaultPrefix = "EMU."
)

// maxBody bounds request bodies; DLF stop and execute bodies are tiny.
const maxBody = 1 << 20

const contentTypeJSON = "application/json;charset=UTF-8"

var (
	bodyNoInstance = []byte(`{"error_code":"` + CodeInstanceNotFound + `","error_msg":"The script execution instance does not exist."}`)
	bodyThrottled  = []byte(`{"error_code":"` + CodeThrottled + `","error_msg":"The throttling threshold has been reached."}`)
	bodyNotFound   = []byte(`{"error_code":"` + CodeNoSuchAPI + `","error_msg":"The API does not exist or has not been published in the environment."}`)
)

type errorBody struct {
	Code string `json:"error_code"`
	Msg  string `json:"error_msg"`
}

type routeKind int

const (
	routeExecute routeKind = iota + 1 // POST /v1/{p}/scripts/{s}/execute
	routeQuery                        // GET  /v1/{p}/scripts/{s}/instances/{i}
	routeStop                         // POST /v1/{p}/scripts/{s}/instances/{i}/stop
)

type route struct {
	kind                      routeKind
	project, script, instance string
}

// parseRoute matches an escaped path and method against the DLF routes;
// path parameters are percent-decoded segment by segment, so an escaped '/'
// stays inside its segment. Matching is exact: no trailing '/', no empty
// parameter.
func parseRoute(method, path string) (route, bool) {
	rest, ok := strings.CutPrefix(path, "/v1/")
	if !ok {
		return route{}, false
	}
	segs := strings.Split(rest, "/")
	if len(segs) < 4 || segs[1] != "scripts" {
		return route{}, false
	}
	var rt route
	switch {
	case len(segs) == 4 && segs[3] == "execute" && method == http.MethodPost:
		rt.kind = routeExecute
	case len(segs) == 5 && segs[3] == "instances" && method == http.MethodGet:
		rt.kind = routeQuery
	case len(segs) == 6 && segs[3] == "instances" && segs[5] == "stop" && method == http.MethodPost:
		rt.kind = routeStop
	default:
		return route{}, false
	}
	var err error
	if rt.project, err = unescapeSegment(segs[0]); err != nil {
		return route{}, false
	}
	if rt.script, err = unescapeSegment(segs[2]); err != nil {
		return route{}, false
	}
	if rt.kind != routeExecute {
		if rt.instance, err = unescapeSegment(segs[4]); err != nil {
			return route{}, false
		}
	}
	return rt, true
}

var errEmptySegment = errors.New("empty path parameter")

func unescapeSegment(s string) (string, error) {
	if s == "" {
		return "", errEmptySegment
	}
	if strings.IndexByte(s, '%') < 0 {
		return s, nil
	}
	v, err := url.PathUnescape(s)
	if err == nil && v == "" {
		err = errEmptySegment
	}
	return v, err
}

// ServeHTTP serves the DLF script API.
func (e *Emulator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !e.enter() {
		abortConn(w)
		return
	}
	defer e.handlers.Done()
	reqID := e.ids.next()
	w.Header().Set(HeaderRequestID, reqID)

	rt, ok := parseRoute(r.Method, r.URL.EscapedPath())
	if ok && rt.kind == routeStop {
		e.serveStop(w, r, rt, reqID)
		return
	}
	global := e.faults.Load()
	if global.Down {
		abortConn(w)
		return
	}
	if !ok {
		writeBody(w, http.StatusNotFound, bodyNotFound)
		e.debug(r, reqID, http.StatusNotFound)
		return
	}
	body, err := readBody(r)
	if err != nil {
		abortConn(w)
		return
	}
	if global.AuthFail {
		writeAuthError(w, "injected fault")
		e.debug(r, reqID, http.StatusUnauthorized)
		return
	}
	if err := e.authenticate(r, body); err != nil {
		writeAuthError(w, err.Error())
		e.debug(r, reqID, http.StatusUnauthorized)
		return
	}
	workspace := r.Header.Get(HeaderWorkspace)
	switch rt.kind {
	case routeExecute:
		id := e.Execute(rt.project, workspace, rt.script)
		writeBody(w, http.StatusOK, []byte(`{"instanceId":"`+id+`"}`))
		e.debug(r, reqID, http.StatusOK)
	case routeQuery:
		st, ok := e.store.statusIn(instKey{rt.project, rt.script, rt.instance}, workspace)
		if !ok {
			writeBody(w, http.StatusBadRequest, bodyNoInstance)
			e.debug(r, reqID, http.StatusBadRequest)
			return
		}
		b, _ := json.Marshal(struct {
			Status  string `json:"status"`
			Results []any  `json:"results"`
		}{st, []any{}})
		writeBody(w, http.StatusOK, b)
		e.debug(r, reqID, http.StatusOK)
	}
}

// serveStop answers a stop request, meeting the faults in the order
// documented on Faults, and records it.
func (e *Emulator) serveStop(w http.ResponseWriter, r *http.Request, rt route, reqID string) {
	arrived := e.now()
	e.stopCalls.Add(1)
	k := instKey{rt.project, rt.script, rt.instance}
	ent := e.store.getOrCreate(k)
	ent.calls.Add(1)
	global := e.faults.Load()
	f := ent.faults.Load()
	if f == nil {
		f = global
	}
	workspace := r.Header.Get(HeaderWorkspace)

	var (
		status  int
		fault   string
		applied bool
		body    []byte
	)
	defer func() {
		if e.log.Core().Enabled(zap.DebugLevel) {
			e.debug(r, reqID, status, zap.String("fault", fault), zap.Bool("applied", applied))
		}
		if !e.reqLog.enabled() {
			return
		}
		if len(body) > maxRecordedBody {
			body = body[:maxRecordedBody]
		}
		e.reqLog.add(Request{
			Time:       arrived,
			Method:     r.Method,
			Path:       r.URL.EscapedPath(),
			RequestURI: r.RequestURI,
			Header:     r.Header.Clone(),
			Host:       r.Host,
			Body:       append([]byte(nil), body...),
			Project:    rt.project,
			Script:     rt.script,
			InstanceID: rt.instance,
			Workspace:  workspace,
			RequestID:  reqID,
			Status:     status,
			Fault:      fault,
			Applied:    applied,
		})
	}()

	if global.Down || f.Down {
		fault = "down"
		abortConn(w)
		return
	}
	var err error
	if body, err = readBody(r); err != nil {
		fault = "closed"
		abortConn(w)
		return
	}
	if f.AuthFail {
		fault, status = "auth_fail", http.StatusUnauthorized
		writeAuthError(w, "injected fault")
		return
	}
	if err := e.authenticate(r, body); err != nil {
		fault, status = "auth", http.StatusUnauthorized
		writeAuthError(w, err.Error())
		return
	}
	if f.Throttle {
		fault, status = "throttle", http.StatusTooManyRequests
		if s, ok := f.retryAfterSeconds(); ok {
			w.Header().Set(HeaderRetryAfter, strconv.FormatInt(s, 10))
		}
		writeBody(w, status, bodyThrottled)
		return
	}
	if f.Latency > 0 {
		t := time.NewTimer(f.Latency)
		select {
		case <-t.C:
		case <-e.done:
			t.Stop()
			fault = "closed"
			abortConn(w)
			return
		}
	}
	if f.Hang {
		select {
		case <-r.Context().Done():
		case <-e.done:
		}
		fault = "hang"
		abortConn(w)
		return
	}
	if e.roll(f.ErrorRate) {
		fault, status = "error", f.ErrorStatus
		if f.RetryAfter > 0 {
			s, _ := f.retryAfterSeconds()
			w.Header().Set(HeaderRetryAfter, strconv.FormatInt(s, 10))
		}
		b, _ := json.Marshal(errorBody{
			Code: CodeFaultPrefix + strconv.Itoa(status),
			Msg:  "Injected fault: " + http.StatusText(status) + ".",
		})
		writeBody(w, status, b)
		return
	}
	applied = e.store.stop(k, workspace)
	if f.DropAfterStop {
		fault = "drop"
		abortConn(w)
		return
	}
	if applied {
		status = http.StatusNoContent
		w.WriteHeader(status)
		return
	}
	status = http.StatusBadRequest
	writeBody(w, status, bodyNoInstance)
}

func readBody(r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err == nil && len(b) > maxBody {
		err = errors.New("request body too large")
	}
	return b, err
}

func writeBody(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", contentTypeJSON)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeAuthError(w http.ResponseWriter, detail string) {
	b, _ := json.Marshal(errorBody{Code: CodeAuth, Msg: "Incorrect IAM authentication information: " + detail})
	writeBody(w, http.StatusUnauthorized, b)
}

// abortConn ends the exchange without an answer: the connection is
// hijacked and closed (the client reads EOF). Where hijacking is not
// possible (HTTP/2) the handler is aborted, which resets the stream.
func abortConn(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			_ = c.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// debug logs one request at debug level; nothing is built when debug is off.
func (e *Emulator) debug(r *http.Request, reqID string, status int, extra ...zap.Field) {
	ce := e.log.Check(zap.DebugLevel, "dlf emulator request")
	if ce == nil {
		return
	}
	fields := append([]zap.Field{
		zap.String("method", r.Method),
		zap.String("path", r.URL.EscapedPath()),
		zap.String("request_id", reqID),
		zap.Int("status", status),
	}, extra...)
	ce.Write(fields...)
}
