package natsconn

import (
	"net/url"
	"regexp"
	"strings"
	"sync"

	"github.com/dlf-stop/worker/internal/config"
)

// minSecretLen is the shortest secret scrubbed by value: replacing one or two
// letters everywhere would garble messages and hide nothing.
const minSecretLen = 4

// userinfoRe matches the user information of a URL inside a message.
var userinfoRe = regexp.MustCompile(`([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s"']*@`)

// redactor scrubs secrets out of messages before they reach an error or a
// log: user information of URLs, and the known secret values.
type redactor struct {
	mu      sync.Mutex
	secrets []string
}

func newRedactor(c config.NATS) *redactor {
	r := &redactor{}
	r.add(c.Password)
	r.add(c.Token)
	for part := range strings.SplitSeq(c.URL, ",") {
		r.addUserinfo(strings.TrimSpace(part))
	}
	return r
}

func (r *redactor) addUserinfo(u string) {
	rest := u
	if i := strings.Index(rest, "://"); i >= 0 {
		rest = rest[i+len("://"):]
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	at := strings.LastIndex(rest, "@")
	if at < 0 {
		return
	}
	info := rest[:at]
	r.add(info)
	user, pass, found := strings.Cut(info, ":")
	if !found {
		pass = user // a user name alone is a token to NATS
	}
	r.add(pass)
	if p, err := url.PathUnescape(pass); err == nil {
		r.add(p)
	}
}

func (r *redactor) add(secret string) {
	if len(secret) < minSecretLen {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.secrets {
		if s == secret {
			return
		}
	}
	r.secrets = append(r.secrets, secret)
}

// scrub returns msg with URL user information and known secrets replaced by
// "[redacted]".
func (r *redactor) scrub(msg string) string {
	msg = userinfoRe.ReplaceAllString(msg, "${1}[redacted]@")
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.secrets {
		msg = strings.ReplaceAll(msg, s, "[redacted]")
	}
	return msg
}
