package dlf

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Names used by the APIG "SDK-HMAC-SHA256" scheme.
const (
	signAlgorithm       = "SDK-HMAC-SHA256"
	HeaderSdkDate       = "X-Sdk-Date"
	HeaderAuthorization = "Authorization"
	HeaderSecurityToken = "X-Security-Token"
	HeaderContentSha256 = "X-Sdk-Content-Sha256"
	// SdkDateFormat is the layout of X-Sdk-Date (UTC, basic ISO 8601).
	SdkDateFormat = "20060102T150405Z"
)

// emptyBodyHash is sha256("") in hex; every stop request has an empty body,
// so the hot path never hashes.
const emptyBodyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// unsignedPayload is what the SDK puts in X-Sdk-Content-Sha256 (and signs
// instead of the body hash) when Content-Type is neither JSON nor BSON.
const unsignedPayload = "UNSIGNED-PAYLOAD"

// SignRequest signs r in place the way the official Huawei Cloud Go SDK
// signer (core/auth/signer, SDK-HMAC-SHA256) does: it sets X-Sdk-Date (now,
// unless r already carries a valid one) and Authorization. Every header
// present on r when it is called is signed, except Content-Type and names
// holding '_', exactly like the SDK; headers that must not be signed (such as
// User-Agent) are therefore added afterwards. body is the exact request body.
//
// Like the SDK, a Content-Type that is neither JSON nor BSON makes it set
// X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD, which is then signed in place of the
// body hash. An Authorization already on r is replaced, never signed, so a
// request can be signed again (delete X-Sdk-Date first to get a fresh date).
//
// The equality with the SDK is proven by sign_sdk_test.go, which runs the
// SDK's own signer over the same requests, and pinned by the known answers in
// sign_test.go.
func SignRequest(r *http.Request, body []byte, ak, sk string, now time.Time) error {
	if ak == "" {
		return errors.New("sign: access key is empty")
	}
	if sk == "" {
		return errors.New("sign: secret key is empty")
	}
	r.Header.Del(HeaderAuthorization)
	if ct, ok := r.Header["Content-Type"]; ok && len(ct) > 0 &&
		!strings.Contains(ct[0], "application/json") && !strings.Contains(ct[0], "application/bson") {
		r.Header.Set(HeaderContentSha256, unsignedPayload)
	}
	date := r.Header.Get(HeaderSdkDate)
	if date == "" || !validSdkDate(date) {
		date = now.UTC().Format(SdkDateFormat)
	}
	r.Header[HeaderSdkDate] = []string{date}

	var buf [12]headerField
	fields := collectHeaders(r.Header, buf[:0], true)
	var sig [sha256.Size * 2]byte
	signature(sig[:], r, body, fields, nil, date, sk)

	var b strings.Builder
	n := len(signAlgorithm) + len(" Access=") + len(ak) + len(", SignedHeaders=") + len(", Signature=") + len(sig)
	for _, f := range fields {
		n += len(f.name) + 1
	}
	b.Grow(n)
	b.WriteString(signAlgorithm)
	b.WriteString(" Access=")
	b.WriteString(ak)
	b.WriteString(", SignedHeaders=")
	writeNames(&b, fields)
	b.WriteString(", Signature=")
	b.Write(sig[:])
	r.Header[HeaderAuthorization] = []string{b.String()}
	return nil
}

func validSdkDate(date string) bool {
	_, err := time.Parse(SdkDateFormat, date)
	return err == nil
}

// ErrSignature is returned by VerifyRequest for every refused request; the
// wrapped text says why without repeating any secret.
var ErrSignature = errors.New("signature refused")

// VerifyRequest checks an SDK-HMAC-SHA256 signed request as the API gateway
// does: the Authorization header must parse, name a known access key, sign
// X-Sdk-Date, carry a date within maxSkew of now, and hold the signature that
// SignRequest computes for the same request. lookup returns the SK for an AK.
// On the server side the Host header lives in r.Host; it is used when the
// client signed "host".
func VerifyRequest(r *http.Request, body []byte, lookup func(ak string) (sk string, ok bool), now time.Time, maxSkew time.Duration) error {
	auth := r.Header.Get(HeaderAuthorization)
	rest, ok := strings.CutPrefix(auth, signAlgorithm+" ")
	if !ok {
		return fmt.Errorf("%w: Authorization is not %s", ErrSignature, signAlgorithm)
	}
	var ak, signedList, sig string
	for part := range strings.SplitSeq(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch k {
		case "Access":
			ak = v
		case "SignedHeaders":
			signedList = v
		case "Signature":
			sig = v
		}
	}
	if ak == "" || signedList == "" || sig == "" {
		return fmt.Errorf("%w: Authorization lacks Access, SignedHeaders or Signature", ErrSignature)
	}
	sk, ok := lookup(ak)
	if !ok {
		return fmt.Errorf("%w: unknown access key", ErrSignature)
	}
	signed := strings.Split(signedList, ";")
	if !slices.Contains(signed, "x-sdk-date") {
		return fmt.Errorf("%w: %s is not signed", ErrSignature, HeaderSdkDate)
	}
	date := r.Header.Get(HeaderSdkDate)
	t, err := time.Parse(SdkDateFormat, date)
	if err != nil {
		return fmt.Errorf("%w: %s is missing or not %s", ErrSignature, HeaderSdkDate, SdkDateFormat)
	}
	if d := now.Sub(t); d > maxSkew || d < -maxSkew {
		return fmt.Errorf("%w: %s is %s from the server clock", ErrSignature, HeaderSdkDate, d.Round(time.Second))
	}
	// Every header (signed or not by the SDK rule) is a candidate: the list
	// in the Authorization header decides what the client signed.
	all := collectHeaders(r.Header, nil, false)
	if r.Host != "" && slices.Contains(signed, "host") && lookupField(all, "host") == nil {
		all = append(all, headerField{name: "host", vals: []string{r.Host}})
		slices.SortFunc(all, func(a, b headerField) int { return strings.Compare(a.name, b.name) })
	}
	fields := make([]headerField, 0, len(signed))
	for _, name := range signed {
		f := headerField{name: name}
		if g := lookupField(all, name); g != nil {
			f.vals = g.vals
		}
		fields = append(fields, f)
	}
	var want [sha256.Size * 2]byte
	signature(want[:], r, body, fields, signed, date, sk)
	if !hmac.Equal(want[:], []byte(sig)) {
		return fmt.Errorf("%w: signature does not match", ErrSignature)
	}
	return nil
}

// headerField is one header as the signer sees it: lower-cased name and
// every value stored under any spelling of that name.
type headerField struct {
	name string
	vals []string
}

func lookupField(fields []headerField, name string) *headerField {
	for i := range fields {
		if fields[i].name == name {
			return &fields[i]
		}
	}
	return nil
}

// collectHeaders returns h's headers sorted by lower-cased name, merging
// spellings that lower-case alike (net/http canonicalises, but a caller may
// set the map directly). With sdkRule it drops what the SDK never signs:
// Content-Type and names holding '_'. The value slices of h are not modified.
func collectHeaders(h http.Header, dst []headerField, sdkRule bool) []headerField {
	for k, v := range h {
		lk := lowerName(k)
		if sdkRule && (strings.HasPrefix(lk, "content-type") || strings.Contains(k, "_")) {
			continue
		}
		dst = append(dst, headerField{name: lk, vals: v})
	}
	slices.SortFunc(dst, func(a, b headerField) int { return strings.Compare(a.name, b.name) })
	// Merge duplicates; they are adjacent after sorting.
	out := dst[:0]
	for _, f := range dst {
		if n := len(out); n > 0 && out[n-1].name == f.name {
			merged := make([]string, 0, len(out[n-1].vals)+len(f.vals))
			merged = append(append(merged, out[n-1].vals...), f.vals...)
			out[n-1].vals = merged
			continue
		}
		out = append(out, f)
	}
	return out
}

// lowerName lower-cases a header name, without allocating for the names the
// client always sends.
func lowerName(k string) string {
	switch k {
	case "X-Sdk-Date":
		return "x-sdk-date"
	case "X-Project-Id":
		return "x-project-id"
	case "Workspace":
		return "workspace"
	case "X-Security-Token":
		return "x-security-token"
	case "Content-Type":
		return "content-type"
	}
	return strings.ToLower(k)
}

func writeNames(b *strings.Builder, fields []headerField) {
	for i, f := range fields {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(f.name)
	}
}

// signature writes into dst (64 bytes) the hex HMAC-SHA256 of the string to
// sign. fields are the signed headers in order; signedList, when not nil, is
// the exact SignedHeaders list (VerifyRequest), else it is derived from fields.
func signature(dst []byte, r *http.Request, body []byte, fields []headerField, signedList []string, date, sk string) {
	size := 192 + 3*len(r.URL.Path) + len(r.URL.RawQuery)
	for _, f := range fields {
		size += 2 * len(f.name)
		for _, v := range f.vals {
			size += len(f.name) + len(v) + 2
		}
	}
	b := make([]byte, 0, size)
	b = append(b, r.Method...)
	b = append(b, '\n')
	b = appendCanonicalURI(b, r.URL.Path)
	b = append(b, '\n')
	if r.URL.RawQuery != "" {
		b = append(b, canonicalQuery(r.URL.Query())...)
	}
	b = append(b, '\n')
	for _, f := range fields {
		vals := f.vals
		if len(vals) > 1 {
			vals = slices.Clone(vals)
			sort.Strings(vals)
		}
		for _, v := range vals {
			b = append(b, f.name...)
			b = append(b, ':')
			b = append(b, strings.TrimSpace(v)...)
			b = append(b, '\n')
		}
	}
	b = append(b, '\n')
	if signedList != nil {
		b = append(b, strings.Join(signedList, ";")...)
	} else {
		for i, f := range fields {
			if i > 0 {
				b = append(b, ';')
			}
			b = append(b, f.name...)
		}
	}
	b = append(b, '\n')
	b = append(b, bodyHash(r.Header, body)...)

	crHash := sha256.Sum256(b)
	sts := b[:0]
	sts = append(sts, signAlgorithm...)
	sts = append(sts, '\n')
	sts = append(sts, date...)
	sts = append(sts, '\n')
	sts = hex.AppendEncode(sts, crHash[:])
	mac := getMAC(sk)
	mac.Write(sts)
	var sum [sha256.Size]byte
	hex.Encode(dst, mac.Sum(sum[:0]))
	putMAC(sk, mac)
}

// macPool keeps keyed HMAC-SHA256 states for the most recent SK, so the hot
// path neither allocates nor re-derives the key pads per request. A new SK
// (rotation) replaces the pool.
type macPool struct {
	sk   string
	pool sync.Pool
}

var currentMACs atomic.Pointer[macPool]

func getMAC(sk string) hash.Hash {
	if p := currentMACs.Load(); p != nil && p.sk == sk {
		if m, ok := p.pool.Get().(hash.Hash); ok {
			return m
		}
	}
	return hmac.New(sha256.New, []byte(sk))
}

func putMAC(sk string, m hash.Hash) {
	m.Reset() // back to the keyed state
	p := currentMACs.Load()
	if p == nil || p.sk != sk {
		p = &macPool{sk: sk}
		currentMACs.Store(p)
	}
	p.pool.Put(m)
}

// bodyHash is the signed payload hash: the X-Sdk-Content-Sha256 header's
// value when the header is there, even empty (the SDK tests the key, not
// the value), else the body's SHA-256.
func bodyHash(h http.Header, body []byte) string {
	if v, ok := h[HeaderContentSha256]; ok {
		if len(v) == 0 {
			return ""
		}
		return v[0]
	}
	if len(body) == 0 {
		return emptyBodyHash
	}
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

// CanonicalURI escapes every segment of an unescaped path and ends it with
// '/', as the SDK signer does. The path a client sends must be this string
// without the final '/', which EscapePathSegment guarantees.
func CanonicalURI(path string) string {
	return string(appendCanonicalURI(nil, path))
}

func appendCanonicalURI(b []byte, path string) []byte {
	start := len(b)
	for i := 0; ; {
		j := strings.IndexByte(path[i:], '/')
		if j < 0 {
			b = appendEscaped(b, path[i:])
			break
		}
		b = appendEscaped(b, path[i:i+j])
		b = append(b, '/')
		i += j + 1
	}
	if len(b) == start || b[len(b)-1] != '/' {
		b = append(b, '/')
	}
	return b
}

func canonicalQuery(q url.Values) string {
	if len(q) == 0 {
		return ""
	}
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		vals := append([]string(nil), q[k]...)
		sort.Strings(vals)
		for _, v := range vals {
			parts = append(parts, EscapePathSegment(k)+"="+EscapePathSegment(v))
		}
	}
	return strings.Join(parts, "&")
}

func unreserved(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' ||
		c == '_' || c == '-' || c == '~' || c == '.'
}

// EscapePathSegment percent-encodes every byte but A-Z a-z 0-9 _ - ~ . with
// upper-case hex: the SDK signer's rule, used for both signing and sending so
// the two can never differ.
func EscapePathSegment(s string) string {
	for i := 0; i < len(s); i++ {
		if !unreserved(s[i]) {
			return string(appendEscaped(make([]byte, 0, len(s)+16), s))
		}
	}
	return s
}

func appendEscaped(b []byte, s string) []byte {
	const hexDigits = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if unreserved(c) {
			b = append(b, c)
			continue
		}
		b = append(b, '%', hexDigits[c>>4], hexDigits[c&15])
	}
	return b
}
