package config

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.uber.org/zap/zapcore"

	"github.com/dlf-stop/worker/internal/secretfile"
)

// varError is one problem with one variable. Its message never holds a
// secret's value.
type varError struct {
	name string
	msg  string
}

func (e *varError) Error() string { return e.name + ": " + e.msg }

func newVarError(name, format string, args ...any) error {
	return &varError{name: name, msg: fmt.Sprintf(format, args...)}
}

// problems collects every problem found.
type problems []error

func (p *problems) add(name, format string, args ...any) {
	*p = append(*p, newVarError(name, format, args...))
}

func (p *problems) merge(errs []error) { *p = append(*p, errs...) }

func (p *problems) positive(name string, d time.Duration) {
	if d <= 0 {
		p.add(name, "must be > 0, got %s", d)
	}
}

var (
	regionRe = regexp.MustCompile(`^[a-z0-9]+(-[a-z0-9]+)*$`)
	idRe     = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)
	bucketRe = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// maxNameLen is JetStream's limit on stream and consumer names.
const maxNameLen = 255

func (n NATS) problems() []error {
	var p problems
	p.natsURLs(n.URL)

	var methods []string
	if n.User != "" || n.Password != "" || n.PasswordFile != "" {
		methods = append(methods, "NATS_USER")
	}
	if n.Token != "" {
		methods = append(methods, "NATS_TOKEN")
	}
	if n.Creds != "" {
		methods = append(methods, "NATS_CREDS")
	}
	if n.NKey != "" {
		methods = append(methods, "NATS_NKEY")
	}
	if len(methods) > 1 {
		p.add(strings.Join(methods, ", "), "set only one NATS authentication method: NATS_USER with NATS_PASSWORD or NATS_PASSWORD_FILE, NATS_TOKEN, NATS_CREDS or NATS_NKEY")
	}
	// nats.go sends a URL's user and password (or token) in place of
	// NATS_USER, NATS_PASSWORD(_FILE), NATS_TOKEN and NATS_NKEY, without a
	// word, and next to NATS_CREDS's JWT: a rotated password file would be
	// read and never used.
	if len(methods) > 0 && len(userinfoSpans(n.URL)) > 0 {
		var set []string
		for _, v := range []struct{ name, value string }{
			{"NATS_USER", n.User}, {"NATS_PASSWORD", n.Password}, {"NATS_PASSWORD_FILE", n.PasswordFile},
			{"NATS_TOKEN", n.Token}, {"NATS_CREDS", n.Creds}, {"NATS_NKEY", n.NKey},
		} {
			if v.value != "" {
				set = append(set, v.name)
			}
		}
		list := strings.Join(set, ", ")
		p.add("NATS_URL", "carries a user name and password or a token, and %s set credentials as well: nats.go would send the URL's and drop those (or send both, with NATS_CREDS); set only one", list)
	}
	password := n.Password != "" || n.PasswordFile != ""
	if n.Password != "" && n.PasswordFile != "" {
		p.add("NATS_PASSWORD", "cannot be combined with NATS_PASSWORD_FILE; set only one")
	}
	if n.User != "" && !password {
		p.add("NATS_PASSWORD", "required when NATS_USER is set (or NATS_PASSWORD_FILE)")
	}
	if n.User == "" && password {
		p.add("NATS_USER", "required when NATS_PASSWORD or NATS_PASSWORD_FILE is set")
	}
	if n.Cert != "" && n.Key == "" {
		p.add("NATS_KEY", "required when NATS_CERT is set")
	}
	if n.Key != "" && n.Cert == "" {
		p.add("NATS_CERT", "required when NATS_KEY is set")
	}
	p.file("NATS_PASSWORD_FILE", n.PasswordFile)
	p.file("NATS_CREDS", n.Creds)
	p.file("NATS_NKEY", n.NKey)
	p.file("NATS_CA", n.CA)
	p.file("NATS_CERT", n.Cert)
	p.file("NATS_KEY", n.Key)
	return p
}

func (p *problems) natsURLs(urls string) {
	const name = "NATS_URL"
	if strings.TrimSpace(urls) == "" {
		p.add(name, "must not be empty")
		return
	}
	// Redact before splitting: a ',' in a password would otherwise leave
	// each half of it shown in its own entry.
	spans := userinfoSpans(urls)
	hint := ""
	if len(spans) > 0 {
		hint = "; percent-encode any '/', '?', '#', '@' or ',' in a user name or password"
	}
	start := 0
	for part := range strings.SplitSeq(urls, ",") {
		lead := len(part) - len(strings.TrimLeftFunc(part, unicode.IsSpace))
		s := strings.TrimSpace(part)
		lo, hi := start+lead, start+lead+len(s)
		shown := redactRange(urls, spans, lo, hi)
		start += len(part) + len(",")
		if s == "" {
			p.add(name, "empty entry in the list %q", RedactURL(urls))
			continue
		}
		raw := s
		if !strings.Contains(s, "://") {
			raw = "nats://" + s
		}
		u, err := url.Parse(raw)
		if err != nil {
			p.add(name, "%q is not a valid URL%s", shown, hint)
			continue
		}
		switch strings.ToLower(u.Scheme) {
		case "nats", "tls", "ws", "wss":
		default:
			p.add(name, "%q: scheme must be nats, tls, ws or wss", shown)
			continue
		}
		if u.Hostname() == "" {
			p.add(name, "%q has no host%s", shown, hint)
			continue
		}
		// What could be user information but does not parse as such is
		// read by nats.go as a host, port or path: "nats://u:12/34@h"
		// dials host u, port 12. The worker would send a piece of the
		// secret to the resolver and quote it in the connect error, whose
		// redaction cannot hide a piece too short to look for (found by
		// review).
		if u.User == nil && atInside(spans, lo, hi) {
			p.add(name, "%q: the user information would be read as a host%s", shown, hint)
		}
	}
}

// atInside tells whether one of spans covers a byte of [lo, hi) and ends
// there, at the '@' that closes it: this entry itself holds what could be
// user information. A span that ends in a later entry may be a password
// holding ',' ("nats://xq,Tok3n@h") or an entry without user information
// before one with it ("nats://h1:4222,u:p@h2"); nobody can tell them
// apart, and the second is a list that works, so it is not refused (found
// by review).
func atInside(spans []span, lo, hi int) bool {
	for _, sp := range spans {
		if sp.start < hi && sp.end > lo && sp.end < hi {
			return true
		}
	}
	return false
}

func (s Subjects) problems() []error {
	var p problems
	p.subject("STOP_SUBJECT", s.StopSubject)
	p.subject("DEAD_SUBJECT", s.DeadSubject)
	prefix := s.OutcomeSubjectPrefix
	if strings.HasSuffix(prefix, ".") {
		p.add("OUTCOME_SUBJECT_PREFIX", "must not end with '.' (outcomes go to <prefix>.<status>), got %q", prefix)
	} else {
		p.subject("OUTCOME_SUBJECT_PREFIX", prefix)
	}
	p.jsName("STOP_STREAM", s.StopStream)
	p.jsName("OUTCOME_STREAM", s.OutcomeStream)
	p.jsName("DEAD_STREAM", s.DeadStream)
	p.jsName("CONSUMER_NAME", s.ConsumerName)
	switch {
	case s.StateBucket == "":
		p.add("STATE_BUCKET", "must not be empty")
	case !bucketRe.MatchString(s.StateBucket) || len(s.StateBucket) > maxNameLen-len("KV_"):
		p.add("STATE_BUCKET", "must be 1-252 characters of A-Z a-z 0-9 _ -, got %q", s.StateBucket)
	}
	if s.StreamReplicas < 1 || s.StreamReplicas > 5 {
		p.add("STREAM_REPLICAS", "must be between 1 and 5, got %d", s.StreamReplicas)
	}

	if s.StopSubject != "" && s.StopSubject == s.DeadSubject {
		p.add("DEAD_SUBJECT", "must differ from STOP_SUBJECT (both %q)", s.StopSubject)
	}
	inOutcomes := func(subject string) bool {
		rest, ok := strings.CutPrefix(subject, prefix+".")
		return prefix != "" && ok && rest != "" && !strings.Contains(rest, ".")
	}
	if inOutcomes(s.StopSubject) {
		p.add("STOP_SUBJECT", "%q overlaps the outcome subjects %s.*", s.StopSubject, prefix)
	}
	if inOutcomes(s.DeadSubject) {
		p.add("DEAD_SUBJECT", "%q overlaps the outcome subjects %s.*", s.DeadSubject, prefix)
	}
	streams := []struct{ name, value string }{
		{"STOP_STREAM", s.StopStream},
		{"OUTCOME_STREAM", s.OutcomeStream},
		{"DEAD_STREAM", s.DeadStream},
	}
	for i, a := range streams {
		for _, b := range streams[:i] {
			if a.value != "" && a.value == b.value {
				p.add(a.name, "must differ from %s (both %q)", b.name, a.value)
			}
		}
		if s.StateBucket != "" && a.value == "KV_"+s.StateBucket {
			p.add(a.name, "%q is the stream of the state bucket STATE_BUCKET", a.value)
		}
	}
	return p
}

// subject accepts a literal NATS subject: dot-separated non-empty tokens,
// no wildcards, no whitespace or control characters.
func (p *problems) subject(name, s string) {
	switch {
	case s == "":
		p.add(name, "must not be empty")
	case !utf8.ValidString(s) || strings.ContainsFunc(s, isSpaceOrControl):
		p.add(name, "must not contain whitespace or control characters, got %q", s)
	case strings.ContainsAny(s, "*>"):
		p.add(name, "must not contain wildcards ('*' or '>'), got %q", s)
	case strings.HasPrefix(s, ".") || strings.HasSuffix(s, ".") || strings.Contains(s, ".."):
		p.add(name, "must be non-empty tokens separated by '.', got %q", s)
	}
}

// jsName accepts a JetStream stream or consumer (durable) name.
func (p *problems) jsName(name, s string) {
	switch {
	case s == "":
		p.add(name, "must not be empty")
	case len(s) > maxNameLen:
		p.add(name, "must be at most %d bytes, got %d", maxNameLen, len(s))
	case !utf8.ValidString(s) || strings.ContainsFunc(s, isSpaceOrControl) || strings.ContainsAny(s, `.*>/\`):
		p.add(name, `must not contain whitespace, control characters, '.', '*', '>', '/' or '\', got %q`, s)
	}
}

func isSpaceOrControl(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }

func (d DLF) problems() []error {
	var p problems
	if d.Region != "" && (len(d.Region) > 64 || !regionRe.MatchString(d.Region)) {
		p.add("DLF_REGION", "invalid region %q (want lower-case letters, digits and '-', e.g. cn-north-4)", d.Region)
	}
	derived := DLF{Region: d.Region}.EndpointURL()
	switch {
	case d.Endpoint != "" && d.Endpoint != derived:
		p.endpoint(d.Endpoint)
	case d.Endpoint == "" && d.Region == "":
		p.add("DLF_ENDPOINT", "not set; set DLF_ENDPOINT or DLF_REGION")
	}

	either := func(inline, file, name string) bool {
		if inline != "" && file != "" {
			p.add(name, "cannot be combined with %s_FILE; set only one", name)
		}
		return inline != "" || file != ""
	}
	ak := either(d.AK, d.AKFile, "HUAWEICLOUD_SDK_AK")
	sk := either(d.SK, d.SKFile, "HUAWEICLOUD_SDK_SK")
	token := either(d.AuthToken, d.AuthTokenFile, "DLF_AUTH_TOKEN")
	if ak && !sk {
		p.add("HUAWEICLOUD_SDK_SK", "required when HUAWEICLOUD_SDK_AK is set (or HUAWEICLOUD_SDK_SK_FILE)")
	}
	if sk && !ak {
		p.add("HUAWEICLOUD_SDK_AK", "required when HUAWEICLOUD_SDK_SK is set (or HUAWEICLOUD_SDK_AK_FILE)")
	}
	if (ak || sk) && token {
		p.add("DLF_AUTH_TOKEN", "cannot be combined with HUAWEICLOUD_SDK_AK/HUAWEICLOUD_SDK_SK; use either AK/SK signing or an IAM token")
	}
	if d.SecurityToken != "" && !(ak && sk) {
		p.add("HUAWEICLOUD_SDK_SECURITY_TOKEN", "requires HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK")
	}
	// A temporary security token belongs to one AK/SK pair, and the worker
	// re-reads the files but not the token: the first rotation would send
	// the new pair with the old token, refused for good.
	if d.SecurityToken != "" && (d.AKFile != "" || d.SKFile != "") {
		p.add("HUAWEICLOUD_SDK_SECURITY_TOKEN", "cannot be combined with HUAWEICLOUD_SDK_AK_FILE or HUAWEICLOUD_SDK_SK_FILE: "+
			"it belongs to one AK/SK pair and would not follow a rotation of the files; give temporary credentials as variables")
	}
	p.file("HUAWEICLOUD_SDK_AK_FILE", d.AKFile)
	p.file("HUAWEICLOUD_SDK_SK_FILE", d.SKFile)
	p.file("DLF_AUTH_TOKEN_FILE", d.AuthTokenFile)

	if d.ProjectID != "" && !idRe.MatchString(d.ProjectID) {
		p.add("HUAWEICLOUD_SDK_PROJECT_ID", "must be 1-64 characters of A-Z a-z 0-9 -, got %q", d.ProjectID)
	}
	if d.Workspace != "" && !idRe.MatchString(d.Workspace) {
		p.add("DLF_WORKSPACE", "must be 1-64 characters of A-Z a-z 0-9 -, got %q", d.Workspace)
	}
	p.positive("DLF_TIMEOUT", d.Timeout)
	return p
}

// shownEndpoint is what an error shows of a DLF_ENDPOINT: scheme, host
// and path, the user information as [redacted] and the query and fragment
// not at all (a query is where a pasted token would sit, and nothing in
// it helps to fix the value). Of a value that does not parse, where the
// user information ends and the query begins cannot be told: it shows
// the part before any '@', '?' or '#', and no more than the scheme when
// there is one (found by review: two earlier forms each showed the start
// of a password or of a query).
func shownEndpoint(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		i := strings.IndexAny(s, "@?#")
		if i < 0 {
			return s
		}
		if j := strings.Index(s, "://"); j >= 0 && j < i {
			return s[:j+3] + "[not shown]"
		}
		return "[not shown]"
	}
	shown := (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path, RawPath: u.RawPath}).String()
	if u.User != nil {
		shown = strings.Replace(shown, "//", "//"+redacted+"@", 1)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		shown += "?[not shown]"
	}
	return shown
}

func (p *problems) endpoint(s string) {
	const name = "DLF_ENDPOINT"
	shown := shownEndpoint(s)
	u, err := url.Parse(s)
	if err != nil {
		p.add(name, "%q is not a valid URL", shown)
		return
	}
	if !u.IsAbs() || u.Hostname() == "" {
		p.add(name, "must be an absolute URL such as https://dayu-dlf.cn-north-4.myhuaweicloud.com, got %q", shown)
		return
	}
	scheme := strings.ToLower(u.Scheme)
	if scheme != "https" && scheme != "http" {
		p.add(name, "scheme must be https (or http for a loopback host), got %q", shown)
		return
	}
	if u.User != nil {
		p.add(name, "must not contain credentials (%q); use HUAWEICLOUD_SDK_AK/HUAWEICLOUD_SDK_SK or DLF_AUTH_TOKEN", shown)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		p.add(name, "must not have a query or fragment, got %q", shown)
	}
	if scheme == "http" && !isLoopback(u.Hostname()) {
		p.add(name, "plain http is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost), got %q; use https", shown)
	}
	// A path the gateway normalises is not the path that was signed, and
	// one that needs escaping is signed escaped (the DLF client refuses
	// both; said here, the error names the variable).
	if prefix := strings.TrimRight(u.Path, "/"); prefix != "" {
		if u.RawPath != "" || strings.TrimLeft(prefix, pathChars) != "" {
			p.add(name, "path may hold only A-Z a-z 0-9 _ - ~ . and '/', got %q", shown)
			return
		}
		for _, seg := range strings.Split(prefix[1:], "/") {
			if seg == "" || seg == "." || seg == ".." {
				p.add(name, "path must not have empty, '.' or '..' segments, got %q", shown)
				break
			}
		}
	}
}

// pathChars are the characters an endpoint's path prefix may hold: the
// ones signing leaves as they are.
const pathChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-~./"

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// file accepts a path to a readable, non-empty regular file (or "", unset).
func (p *problems) file(name, path string) {
	if path == "" {
		return
	}
	f, err := secretfile.OpenRegular(path)
	if errors.Is(err, secretfile.ErrNotRegular) {
		p.add(name, "%q is not a regular file", path)
		return
	}
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		// The value is not shown: a secret put where the path to its file
		// belongs (an nkey seed in NATS_NKEY, an SK in
		// HUAWEICLOUD_SDK_SK_FILE) is the likeliest value that is no file.
		p.add(name, "cannot open the file it names (value not shown): %v", err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	switch {
	case err != nil:
		p.add(name, "cannot stat %q", path)
	case fi.Size() == 0:
		p.add(name, "%q is empty", path)
	}
}

func (p *problems) rate(limit float64, burst int) {
	if limit < 0 || math.IsNaN(limit) || math.IsInf(limit, 0) {
		p.add("DLF_RATE_LIMIT", "must be >= 0 requests per second (0 turns it off), got %v", limit)
	}
	if burst < 0 {
		p.add("DLF_RATE_BURST", "must be >= 0, got %d", burst)
	} else if limit > 0 && burst < 1 {
		p.add("DLF_RATE_BURST", "must be >= 1 when DLF_RATE_LIMIT is set")
	}
}

func (p *problems) httpAddr(addr string) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		p.add("HTTP_ADDR", "invalid address %q (want host:port or :port)", addr)
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		p.add("HTTP_ADDR", "invalid port in %q (want 0-65535)", addr)
	}
}

func (p *problems) logLevel(level string) {
	if _, err := zapcore.ParseLevel(level); err != nil || level == "" {
		p.add("LOG_LEVEL", "unknown level %q (want debug, info, warn, error, dpanic, panic or fatal)", level)
	}
}
