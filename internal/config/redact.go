package config

import (
	"net/url"
	"strings"
	"unicode"
	"unicode/utf8"
)

const redacted = "[redacted]"

// RedactURL returns a URL, or a comma separated list of them, with anything
// that could be user information replaced by "[redacted]". It works on text
// that does not parse as a URL too.
//
// A password may hold '/', '?', '#', ',' or '@' unescaped, and then no parser
// can tell where it ends, so RedactURL errs on the side of hiding too much:
// everything between a scheme's "://" and the last '@' before the next URL of
// the list (or the end) is replaced, and likewise from the start of the text
// when it does not start with a scheme. A host or path that sits before such
// an '@' is hidden with it. The whole list is scanned before it is split, as
// a ',' may belong to a password. NATS takes a user name without a password
// as a token, so the whole user information is redacted, not only the
// password. The one password it cannot hide is one that makes the text look
// like the start of a URL (a scheme and "://" at the start of the text or
// after a ',' or white space) and whose part before that reads as a host,
// port or path: "u:80, x://y@h" shows "u:80", and a token "t0k, x://y@h"
// shows "t0k". Otherwise text before another URL that has no '@' and is
// not plain hosts is hidden as well: in "u:p, x://y@h", "u:p" is the start
// of a password.
func RedactURL(s string) string {
	return redactRange(s, userinfoSpans(s), 0, len(s))
}

// URLUserinfo returns the pieces of s that RedactURL replaces, in order.
// Text that quotes a URL only in part, as nats.go does after splitting the
// list on ',', needs the values themselves to scrub it.
func URLUserinfo(s string) []string {
	var out []string
	for _, sp := range userinfoSpans(s) {
		out = append(out, s[sp.start:sp.end])
	}
	return out
}

// span is a byte range [start, end) of a string.
type span struct{ start, end int }

// userinfoSpans returns the non-empty ranges of s that could be user
// information (see RedactURL).
func userinfoSpans(s string) []span {
	var spans []span
	// Text before the first scheme is a URL without one ("u:p@h:4222");
	// leading separators are kept so that " u:p@h" stays readable.
	from := len(s) - len(strings.TrimLeftFunc(s, func(r rune) bool { return r == ',' || unicode.IsSpace(r) }))
	for {
		next, content := nextURL(s, from)
		if at := strings.LastIndexByte(s[from:next], '@'); at > 0 {
			spans = append(spans, span{from, from + at})
		} else if end := from + len(strings.TrimRightFunc(s[from:next], isListSep)); next < len(s) && !hostsOnly(s[from:end]) {
			// No '@' before another URL, yet not plain hosts: the
			// start of a password that looks like the start of the
			// next URL ("u:p, x://y@h" reads as "u:p" and "x://y@h").
			spans = append(spans, span{from, end})
		}
		if next == len(s) {
			return spans
		}
		from = content
	}
}

// nextURL finds, at or after from, the scheme of the next URL of a list and
// returns where that scheme starts and where the text after its "://"
// starts, or len(s) twice. Only a scheme at the start of s or after ',' or
// white space counts: a "://" inside a password ("u:a://b@h") must not end
// the user information early.
func nextURL(s string, from int) (schemeStart, content int) {
	for i := from; ; {
		k := strings.Index(s[i:], "://")
		if k < 0 {
			return len(s), len(s)
		}
		sep := i + k
		j := sep
		for j > from && isSchemeByte(s[j-1]) {
			j--
		}
		if j < sep && isLetter(s[j]) && atListBoundary(s, j) {
			return j, sep + len("://")
		}
		i = sep + len("://")
	}
}

func isListSep(r rune) bool { return r == ',' || unicode.IsSpace(r) }

// hostsOnly says whether s, the text after a scheme's "://" (or a list
// entry without one), is a list of hosts with optional numeric ports and
// paths, nothing that could be part of a user's password. Empty text is.
func hostsOnly(s string) bool {
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if u, err := url.Parse("nats://" + part); err != nil || u.Hostname() == "" || u.User != nil {
			return false
		}
	}
	return true
}

func atListBoundary(s string, i int) bool {
	if i == 0 {
		return true
	}
	r, _ := utf8.DecodeLastRuneInString(s[:i])
	return r == ',' || unicode.IsSpace(r)
}

func isLetter(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }

func isSchemeByte(c byte) bool {
	return isLetter(c) || '0' <= c && c <= '9' || c == '+' || c == '-' || c == '.'
}

// redactRange returns s[a:b] with the parts inside spans replaced by
// "[redacted]". Showing one entry of a list through the spans of the whole
// list keeps a password that holds a ',' hidden in both entries it spans.
func redactRange(s string, spans []span, a, b int) string {
	var out strings.Builder
	pos := a
	for _, sp := range spans {
		lo, hi := max(sp.start, pos), min(sp.end, b)
		if lo >= hi {
			continue
		}
		out.WriteString(s[pos:lo])
		out.WriteString(redacted)
		pos = hi
	}
	out.WriteString(s[pos:b])
	return out.String()
}
