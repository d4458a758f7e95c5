package dlf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Defaults for Config.
const (
	DefaultTimeout   = 10 * time.Second
	DefaultMaxConns  = 32
	DefaultUserAgent = "dlf-stop-worker"
)

const (
	maxErrorBody    = 64 << 10 // bytes of an error body read at most
	maxErrorMsg     = 1024     // bytes of error_msg kept
	maxErrorCode    = 128      // bytes of error_code / request id kept
	maxRetryAfter   = 24 * time.Hour
	headerRequestID = "X-Request-Id"
	headerAuthToken = "X-Auth-Token"
	headerProjectID = "X-Project-Id"
	headerWorkspace = "Workspace" // sent as "workspace" in Huawei's docs; names are case-insensitive
)

// StopRequest names one script instance to stop. Every field is a path
// segment or header value taken as is (no defaults are applied here).
type StopRequest struct {
	ProjectID, Workspace, ScriptName, InstanceID string
}

// Credentials authenticate one call: either AK/SK (with SecurityToken for
// temporary credentials), signed SDK-HMAC-SHA256, or AuthToken, an IAM token
// sent as X-Auth-Token. AuthToken is exclusive with AK/SK.
type Credentials struct {
	AK, SK, SecurityToken, AuthToken string
}

// Config configures a Client. Zero fields take the defaults above.
type Config struct {
	// Endpoint is the base URL, e.g. https://dayu-dlf.cn-north-4.myhuaweicloud.com.
	// http:// is accepted only for loopback hosts (127.0.0.0/8, ::1, localhost).
	Endpoint string
	// Credentials is called for every request, so rotated secrets apply
	// without a restart. nil means unauthenticated (tests only).
	Credentials func() Credentials
	// Timeout bounds one call, answer body included. Default 10s.
	Timeout time.Duration
	// MaxConns is the number of connections (idle and in use) kept per host;
	// the worker passes its concurrency. Default 32.
	MaxConns int
	// UserAgent is sent unsigned. Default "dlf-stop-worker".
	UserAgent string
}

func (c *Config) setDefaults() {
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.UserAgent == "" {
		c.UserAgent = DefaultUserAgent
	}
}

// Validate checks the configuration after defaults; the endpoint rules are
// those of the contract (section 7).
func (c *Config) Validate() error {
	if c.Timeout < 0 {
		return fmt.Errorf("dlf config: timeout %s is negative", c.Timeout)
	}
	if c.MaxConns < 0 {
		return fmt.Errorf("dlf config: max conns %d is negative", c.MaxConns)
	}
	if _, _, _, err := parseEndpoint(c.Endpoint); err != nil {
		return fmt.Errorf("dlf config: %w", err)
	}
	return nil
}

// parseEndpoint returns scheme, host and the path prefix (no trailing '/').
func parseEndpoint(endpoint string) (scheme, host, prefix string, err error) {
	if endpoint == "" {
		return "", "", "", errors.New("endpoint is empty")
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		// url.Error quotes the input; an endpoint holds no secret we accept,
		// but keep the message short and free of userinfo anyway.
		return "", "", "", errors.New("endpoint is not a URL")
	}
	if u.User != nil {
		return "", "", "", errors.New("endpoint must not carry user information")
	}
	if u.Hostname() == "" || u.Opaque != "" { // "https://:443" would dial this machine
		return "", "", "", fmt.Errorf("endpoint %q has no host", endpoint)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return "", "", "", fmt.Errorf("endpoint %q must not have a query or fragment", endpoint)
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopback(u.Hostname()) {
			return "", "", "", fmt.Errorf("endpoint %q: plain http is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost)", endpoint)
		}
	default:
		return "", "", "", fmt.Errorf("endpoint %q: scheme must be https (or http for loopback hosts)", endpoint)
	}
	prefix = strings.TrimRight(u.Path, "/")
	if u.RawPath != "" || (prefix != "" && CanonicalURI(prefix) != prefix+"/") {
		return "", "", "", fmt.Errorf("endpoint %q: path prefix may hold only A-Z a-z 0-9 _ - ~ . and '/'", endpoint)
	}
	// A proxy or gateway that normalises "/a/../b" or "/a//b" would make
	// every signature wrong (the signed path is the one sent): the worker
	// would see nothing but 401s.
	if prefix != "" {
		for _, seg := range strings.Split(prefix[1:], "/") {
			if seg == "" || seg == "." || seg == ".." {
				return "", "", "", fmt.Errorf("endpoint %q: path prefix must not have empty, '.' or '..' segments", endpoint)
			}
		}
	}
	return u.Scheme, u.Host, prefix, nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// EndpointForRegion returns the public DLF endpoint of a region,
// https://dayu-dlf.<region>.myhuaweicloud.com.
func EndpointForRegion(region string) string {
	return "https://dayu-dlf." + region + ".myhuaweicloud.com"
}

// ValidateStopRequest is the client's last line of defence, not the
// contract's field rules (the consumer applies those): ProjectID, ScriptName
// and InstanceID must be non-empty, valid UTF-8, free of '/' and control
// characters, and not "." or ".."; Workspace, when set, must be valid UTF-8
// without control characters.
func ValidateStopRequest(r StopRequest) error {
	if err := validateSegment("project_id", r.ProjectID); err != nil {
		return err
	}
	if err := validateSegment("script_name", r.ScriptName); err != nil {
		return err
	}
	if err := validateSegment("instance_id", r.InstanceID); err != nil {
		return err
	}
	if r.Workspace != "" {
		if err := validateText("workspace", r.Workspace); err != nil {
			return err
		}
	}
	return nil
}

func validateSegment(field, v string) error {
	switch {
	case v == "":
		return fmt.Errorf("%w: %s is empty", ErrInvalidRequest, field)
	case v == "." || v == "..":
		return fmt.Errorf("%w: %s must not be %q", ErrInvalidRequest, field, v)
	case strings.IndexByte(v, '/') >= 0:
		return fmt.Errorf("%w: %s must not contain '/'", ErrInvalidRequest, field)
	}
	return validateText(field, v)
}

func validateText(field, v string) error {
	if !utf8.ValidString(v) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalidRequest, field)
	}
	for _, r := range v {
		if unicode.IsControl(r) {
			return fmt.Errorf("%w: %s contains a control character", ErrInvalidRequest, field)
		}
	}
	return nil
}

// Client calls the DLF stop API. It is safe for concurrent use and should be
// reused: it holds one *http.Client whose connections are kept alive.
type Client struct {
	hc      *http.Client
	scheme  string
	host    string
	prefix  string // path prefix, unreserved characters only
	creds   func() Credentials
	timeout time.Duration
	ua      string
	now     func() time.Time
}

// Option injects a dependency into a Client.
type Option func(*Client)

// WithHTTPClient makes the client use (a shallow copy of) hc instead of its
// own tuned one. Its redirect policy is overridden: redirects are never
// followed. nil keeps the default.
//
// The connections of such a client are not dialled by this package, so
// TransportError.Sent cannot count the bytes they accept and rests on
// net/http's word alone (see TransportError): a request whose final write
// to the connection failed then still counts as sent.
func WithHTTPClient(hc *http.Client) Option {
	return func(c *Client) {
		if hc != nil {
			c.hc = hc
		}
	}
}

// WithClock sets the clock used for X-Sdk-Date and to read Retry-After
// dates. nil keeps time.Now.
func WithClock(now func() time.Time) Option {
	return func(c *Client) {
		if now != nil {
			c.now = now
		}
	}
}

// NewClient validates cfg (after defaults) and builds a Client.
func NewClient(cfg Config, opts ...Option) (*Client, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	scheme, host, prefix, _ := parseEndpoint(cfg.Endpoint)
	c := &Client{
		scheme:  scheme,
		host:    host,
		prefix:  prefix,
		creds:   cfg.Credentials,
		timeout: cfg.Timeout,
		ua:      cfg.UserAgent,
		now:     time.Now,
	}
	for _, o := range opts {
		o(c)
	}
	if c.hc == nil {
		dialer := &net.Dialer{Timeout: min(cfg.Timeout, 5*time.Second), KeepAlive: 30 * time.Second}
		c.hc = &http.Client{Transport: newTransport(cfg, dialer.DialContext)}
	} else {
		hc := *c.hc // shallow copy: never change the caller's client
		c.hc = &hc
	}
	c.hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return c, nil
}

// idleConnTimeout closes a kept-alive connection before the gateways in
// front of DLF are likely to (60s is common for load balancers). When the
// server side closes an idle connection just as a request goes out on it,
// the request was written and then the connection read as closed: that is
// indistinguishable from a request DLF received and never answered, so it
// counts as sent (TransportError.Sent), and a later DLF.6205 for the same
// command would read as already stopped. Closing first keeps that race
// from happening at the server's timeout.
const idleConnTimeout = 30 * time.Second

// newTransport builds the client's transport over dial. Every connection it
// makes counts the bytes written to it (countingConn), which is how Stop
// tells whether a request left the process (TransportError.Sent).
func newTransport(cfg Config, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           countingDial(dial),
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          cfg.MaxConns,
		MaxIdleConnsPerHost:   cfg.MaxConns,
		MaxConnsPerHost:       cfg.MaxConns,
		IdleConnTimeout:       idleConnTimeout,
		TLSHandshakeTimeout:   min(cfg.Timeout, 10*time.Second),
		ExpectContinueTimeout: time.Second,
	}
}

// CloseIdleConnections closes the kept-alive connections; call it on shutdown.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Response is a DLF answer. Stop returns it for every answer: alone for 2xx,
// with an *APIError for every other status.
type Response struct {
	StatusCode int
	RequestID  string
}

// Stop calls POST /v1/{project_id}/scripts/{script_name}/instances/{instance_id}/stop.
//
// It returns (*Response, nil) for a 2xx answer; (*Response, *APIError) for any
// other answer (3xx included: redirects are not followed);
// (nil, *TransportError) when no answer came; (nil, error wrapping
// ErrInvalidRequest or ErrCredentials) when nothing was sent. No error holds
// the SK, a token or the Authorization value.
func (c *Client) Stop(ctx context.Context, r StopRequest) (*Response, error) {
	if err := ValidateStopRequest(r); err != nil {
		return nil, err
	}
	var creds Credentials
	if c.creds != nil {
		creds = c.creds()
		if err := checkCredentials(creds); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, &TransportError{Err: err, Timeout: errors.Is(err, context.DeadlineExceeded)}
	}

	callCtx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var st sendTracker
	req, err := c.newRequest(httptrace.WithClientTrace(callCtx, st.trace()), r, creds)
	if err != nil {
		return nil, err
	}

	red := newRedactor(creds, req.Header.Get(HeaderAuthorization))
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, transportError(ctx, err, st.sent(), red)
	}
	defer resp.Body.Close()

	out := &Response{StatusCode: resp.StatusCode, RequestID: red.text(resp.Header.Get(headerRequestID), maxErrorCode)}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		if resp.Body != http.NoBody {
			// Drain an unexpected body so the connection is reused.
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		}
		return out, nil
	}
	apiErr := &APIError{
		StatusCode: resp.StatusCode,
		RequestID:  out.RequestID,
		RetryAfter: ParseRetryAfter(resp.Header.Get("Retry-After"), c.now()),
	}
	// A 1xx that reaches us is 101 Switching Protocols, whose body is the
	// raw connection: never read it. A body cut short (read error, timeout)
	// still leaves an answer: decode what arrived; partial JSON gives nothing.
	if resp.StatusCode >= 200 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		decodeErrorBody(body, apiErr, red)
	}
	out.RequestID = apiErr.RequestID
	return out, apiErr
}

// checkCredentials refuses credentials that cannot make a request, before
// one is built: a value bound for a header (the AK in Authorization, the
// tokens) with a control character would be refused by net/http only as
// the request is sent, which reads as a transport failure and counts as a
// call. The SK is a signing key only.
func checkCredentials(cr Credentials) error {
	for _, v := range []struct{ name, value string }{
		{"the AK", cr.AK}, {"the security token", cr.SecurityToken}, {"the auth token", cr.AuthToken},
	} {
		if i := strings.IndexFunc(v.value, isHeaderControl); i >= 0 {
			return fmt.Errorf("%w: %s holds a control character at byte %d (a line break inside its file?)", ErrCredentials, v.name, i)
		}
	}
	switch {
	case cr.AuthToken != "" && (cr.AK != "" || cr.SK != ""):
		return fmt.Errorf("%w: both AK/SK and an auth token are set", ErrCredentials)
	case cr.AuthToken != "":
		return nil
	case cr.AK == "" && cr.SK == "":
		return fmt.Errorf("%w: neither AK/SK nor an auth token is set", ErrCredentials)
	case cr.AK == "" || cr.SK == "":
		return fmt.Errorf("%w: AK and SK must both be set", ErrCredentials)
	}
	return nil
}

// isHeaderControl reports a character no header value may hold (RFC 9110
// section 5.5 allows horizontal tab).
func isHeaderControl(r rune) bool { return r < ' ' && r != '\t' || r == 0x7f }

// newRequest builds the signed request exactly as it goes on the wire.
func (c *Client) newRequest(ctx context.Context, r StopRequest, creds Credentials) (*http.Request, error) {
	path, rawPath := c.stopPath(r)
	// An empty URL parses without work; the real one is filled in place.
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "", nil)
	if err != nil {
		return nil, fmt.Errorf("dlf: build request: %w", err)
	}
	*req.URL = url.URL{Scheme: c.scheme, Host: c.host, Path: path, RawPath: rawPath}

	// One backing array for every header value slice.
	vals := [6]string{r.ProjectID, "application/json", r.Workspace, creds.SecurityToken, creds.AuthToken, c.ua}
	h := make(http.Header, 8)
	h[headerProjectID] = vals[0:1:1]
	h["Content-Type"] = vals[1:2:2]
	if r.Workspace != "" {
		h[headerWorkspace] = vals[2:3:3]
	}
	if creds.SecurityToken != "" {
		h[HeaderSecurityToken] = vals[3:4:4]
	}
	req.Header = h
	switch {
	case creds.AuthToken != "":
		h[headerAuthToken] = vals[4:5:5]
	case creds.AK != "":
		if err := SignRequest(req, nil, creds.AK, creds.SK, c.now()); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCredentials, err)
		}
	}
	h["User-Agent"] = vals[5:6:6] // after signing: never signed
	return req, nil
}

// stopPath returns the unescaped path and, when it differs, the escaped one.
// The escaped path equals CanonicalURI(path) without its final '/'.
func (c *Client) stopPath(r StopRequest) (path, rawPath string) {
	const (
		p1 = "/v1/"
		p2 = "/scripts/"
		p3 = "/instances/"
		p4 = "/stop"
	)
	n := len(c.prefix) + len(p1) + len(p2) + len(p3) + len(p4) + len(r.ProjectID) + len(r.ScriptName) + len(r.InstanceID)
	var b strings.Builder
	b.Grow(n)
	b.WriteString(c.prefix)
	b.WriteString(p1)
	b.WriteString(r.ProjectID)
	b.WriteString(p2)
	b.WriteString(r.ScriptName)
	b.WriteString(p3)
	b.WriteString(r.InstanceID)
	b.WriteString(p4)
	path = b.String()
	// The prefix holds only unreserved characters (parseEndpoint).
	esc := escapedBytes(r.ProjectID) + escapedBytes(r.ScriptName) + escapedBytes(r.InstanceID)
	if esc == 0 {
		return path, ""
	}
	var raw strings.Builder
	raw.Grow(n + 2*esc)
	raw.WriteString(c.prefix)
	raw.WriteString(p1)
	writeEscaped(&raw, r.ProjectID)
	raw.WriteString(p2)
	writeEscaped(&raw, r.ScriptName)
	raw.WriteString(p3)
	writeEscaped(&raw, r.InstanceID)
	raw.WriteString(p4)
	return path, raw.String()
}

// writeEscaped writes EscapePathSegment(s) to b.
func writeEscaped(b *strings.Builder, s string) {
	const hexDigits = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if unreserved(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
}

// escapedBytes counts the bytes of s that EscapePathSegment encodes.
func escapedBytes(s string) int {
	n := 0
	for i := 0; i < len(s); i++ {
		if !unreserved(s[i]) {
			n++
		}
	}
	return n
}

// transportError wraps a failed Do. parent is the caller's context: when it
// was cancelled the error matches context.Canceled.
func transportError(parent context.Context, err error, sent bool, red *redactor) error {
	if pe := parent.Err(); pe != nil && !errors.Is(err, pe) {
		err = fmt.Errorf("%w: %w", pe, err)
	}
	var ne net.Error
	timeout := errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
	return &TransportError{Err: &redactedError{err: err, msg: red.text(err.Error(), maxTransportErrorText)}, Sent: sent, Timeout: timeout}
}

// maxTransportErrorText bounds the text of a transport error: net/http
// quotes what a peer sent in some of them.
const maxTransportErrorText = 2048

// redactedError is err with its text redacted: net/http quotes a malformed
// answer's line in its error, and a peer (a gateway, a proxy) may echo the
// request's Authorization or token there (found by review: the token, the
// AK and the signature reached the error string, and the debug log).
// Unwrap keeps errors.Is and errors.As working on err.
type redactedError struct {
	err error
	msg string
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// errorBody is the DLF / API gateway error body. Fields are raw so a code
// sent as a number does not spoil the rest.
type errorBody struct {
	ErrorCode json.RawMessage `json:"error_code"`
	ErrorMsg  json.RawMessage `json:"error_msg"`
}

// decodeErrorBody fills code and message from body; a body that is not
// that JSON object leaves them. A "request_id" in the body is not taken:
// the outcome's dlf_request_id is the X-Request-Id header's, when present
// (contract section 4), and an id from elsewhere could not be told apart
// from it (found by review).
func decodeErrorBody(body []byte, e *APIError, red *redactor) {
	var eb errorBody
	if len(body) == 0 || json.Unmarshal(body, &eb) != nil {
		return
	}
	e.ErrorCode = red.text(rawString(eb.ErrorCode), maxErrorCode)
	e.ErrorMsg = red.text(rawString(eb.ErrorMsg), maxErrorMsg)
}

func rawString(m json.RawMessage) string {
	if len(m) == 0 || string(m) == "null" {
		return ""
	}
	var s string
	if json.Unmarshal(m, &s) == nil {
		return s
	}
	// A number, or an object or array a misbehaving gateway sent. Its
	// strings are written again without escapes the sender may have
	// chosen (\/, \u002b): the redactor looks for secrets as they were
	// sent, and an escaped echo would slip past it.
	d := json.NewDecoder(bytes.NewReader(m))
	d.UseNumber() // numbers as written
	var v any
	if d.Decode(&v) != nil {
		return ""
	}
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	if e.Encode(v) != nil {
		return ""
	}
	return strings.TrimSpace(b.String())
}

// cleanText makes s safe for logs, outcome fields and NATS headers: valid
// UTF-8, control characters turned into spaces, trimmed, at most max bytes.
func cleanText(s string, max int) string {
	clean := true
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f || c >= utf8.RuneSelf {
			clean = false
			break
		}
	}
	if clean && len(s) <= max {
		return strings.TrimSpace(s)
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	if len(s) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		// Trimmed again after the cut: NATS headers cannot end in white
		// space, and a dead letter's Dlf-Error-Msg must equal the outcome's
		// error_msg (found by review).
		s = strings.TrimSpace(s[:cut])
	}
	return s
}

// redactor removes the secrets of one call from text taken from its answer,
// in case a misbehaving server or proxy echoes the request. Secrets shorter
// than 8 bytes are not searched for (they would mangle the text and are no
// real secret).
type redactor struct{ secrets [6]string }

// The AK is among them: Huawei's gateway names it in the 401 for an AK it
// does not know ("Get secretKey failed,ak:<AK>,err:ak not exist"), which is
// what an AK deleted at IAM before its file was rotated gets, and the AK is
// as much a credential as the rest. The whole Authorization value goes
// first, so its parts never leave pieces behind.
func newRedactor(cr Credentials, authorization string) *redactor {
	return &redactor{secrets: [6]string{authorization, signatureOf(authorization), cr.SK, cr.SecurityToken, cr.AuthToken, cr.AK}}
}

// text redacts s, then cleans it and cuts it to max bytes (in that order, so
// a cut never leaves part of a secret behind).
func (r *redactor) text(s string, max int) string {
	for _, secret := range r.secrets {
		if len(secret) >= 8 && strings.Contains(s, secret) {
			s = strings.ReplaceAll(s, secret, "[REDACTED]")
		}
	}
	return cleanText(s, max)
}

func signatureOf(authorization string) string {
	if _, sig, ok := strings.Cut(authorization, "Signature="); ok {
		return sig
	}
	return ""
}

// ParseRetryAfter reads a Retry-After value: delay seconds or an HTTP date
// (relative to now). Absent, unparsable, negative or past values give 0;
// values are capped at 24h.
func ParseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if v[0] >= '0' && v[0] <= '9' {
		secs, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			if errors.Is(err, strconv.ErrRange) {
				return maxRetryAfter
			}
			return 0
		}
		if secs >= uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter
		}
		return time.Duration(secs) * time.Second
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0
	}
	d := t.Sub(now)
	if d <= 0 {
		return 0
	}
	return min(d, maxRetryAfter)
}
