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

// urlRe matches a URL inside a message, up to the next white space; a
// password's '/', '?', '#', ',' or '@' does not end it, so config.RedactURL
// sees all of it.
var urlRe = regexp.MustCompile(`[A-Za-z][A-Za-z0-9+.-]*://\S*`)

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
	// The whole list, not its entries: a ',' may belong to a password.
	for _, info := range config.URLUserinfo(c.URL) {
		r.addUserinfo(info)
	}
	return r
}

// addUserinfo adds the values nats.go may quote on their own: it splits
// NATS_URL on ',' and a URL parser ends the user information at '/', '?' or
// '#', so a message can hold a password, a piece of it ("invalid port
// \":piece\""), or its unescaped form without the rest of the URL.
func (r *redactor) addUserinfo(info string) {
	r.add(info)
	user, pass, found := strings.Cut(info, ":")
	if !found {
		pass = user // a user name alone is a token to NATS
	}
	pieces := strings.FieldsFunc(pass, func(c rune) bool { return strings.ContainsRune(",/?#@", c) })
	for _, p := range append([]string{pass}, pieces...) {
		r.add(p)
		if u, err := url.PathUnescape(p); err == nil {
			r.add(u)
		}
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
	msg = urlRe.ReplaceAllStringFunc(msg, config.RedactURL)
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.secrets {
		msg = strings.ReplaceAll(msg, s, "[redacted]")
	}
	return msg
}
