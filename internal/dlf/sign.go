package dlf

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strings"
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

// SignRequest signs r in place the way the official Huawei Cloud Go SDK
// signer (core/auth/signer, SDK-HMAC-SHA256) does: it sets X-Sdk-Date (now,
// unless r already carries a valid one) and Authorization. Every header
// present on r when it is called is signed, except Content-Type and names
// holding '_', exactly like the SDK; headers that must not be signed (such as
// User-Agent) are therefore added afterwards. body is the exact request body.
//
// The equality with the SDK is proven by sign_sdk_test.go, which runs the
// SDK's own signer over the same requests.
func SignRequest(r *http.Request, body []byte, ak, sk string, now time.Time) error {
	if ak == "" {
		return errors.New("sign: access key is empty")
	}
	if sk == "" {
		return errors.New("sign: secret key is empty")
	}
	date := r.Header.Get(HeaderSdkDate)
	if _, err := time.Parse(SdkDateFormat, date); date == "" || err != nil {
		date = now.UTC().Format(SdkDateFormat)
	}
	r.Header.Set(HeaderSdkDate, date)
	signed := signedHeaderNames(r.Header)
	sig := signature(r, body, signed, date, sk)
	r.Header.Set(HeaderAuthorization, signAlgorithm+" Access="+ak+", SignedHeaders="+strings.Join(signed, ";")+", Signature="+sig)
	return nil
}

// ErrSignature is returned by VerifyRequest for every refused request; the
// wrapped text says why without repeating any secret.
var ErrSignature = errors.New("signature refused")

// VerifyRequest checks an SDK-HMAC-SHA256 signed request as the API gateway
// does: the Authorization header must parse, name a known access key, sign
// X-Sdk-Date, carry a date within maxSkew of now, and hold the signature that
// SignRequest computes for the same request. lookup returns the SK for an AK.
func VerifyRequest(r *http.Request, body []byte, lookup func(ak string) (sk string, ok bool), now time.Time, maxSkew time.Duration) error {
	auth := r.Header.Get(HeaderAuthorization)
	rest, ok := strings.CutPrefix(auth, signAlgorithm+" ")
	if !ok {
		return fmt.Errorf("%w: Authorization is not %s", ErrSignature, signAlgorithm)
	}
	var ak, signedList, sig string
	for _, part := range strings.Split(rest, ",") {
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
	if !containsString(signed, strings.ToLower(HeaderSdkDate)) {
		return fmt.Errorf("%w: %s is not signed", ErrSignature, HeaderSdkDate)
	}
	date := r.Header.Get(HeaderSdkDate)
	t, err := time.Parse(SdkDateFormat, date)
	if err != nil {
		return fmt.Errorf("%w: %s is not %s", ErrSignature, HeaderSdkDate, SdkDateFormat)
	}
	if d := now.Sub(t); d > maxSkew || d < -maxSkew {
		return fmt.Errorf("%w: %s is %s from the server clock", ErrSignature, HeaderSdkDate, d.Round(time.Second))
	}
	want := signature(r, body, signed, date, sk)
	if !hmac.Equal([]byte(want), []byte(sig)) {
		return fmt.Errorf("%w: signature does not match", ErrSignature)
	}
	return nil
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// signedHeaderNames lists the lower-cased header names the SDK would sign.
func signedHeaderNames(h http.Header) []string {
	names := make([]string, 0, len(h))
	for k := range h {
		lk := strings.ToLower(k)
		if strings.HasPrefix(lk, "content-type") || strings.Contains(k, "_") {
			continue
		}
		names = append(names, lk)
	}
	sort.Strings(names)
	return names
}

func signature(r *http.Request, body []byte, signed []string, date, sk string) string {
	var b strings.Builder
	b.Grow(256)
	b.WriteString(r.Method)
	b.WriteByte('\n')
	b.WriteString(CanonicalURI(r.URL.Path))
	b.WriteByte('\n')
	b.WriteString(canonicalQuery(r.URL.Query()))
	b.WriteByte('\n')
	for _, name := range signed {
		vals := headerValues(r.Header, name)
		sort.Strings(vals)
		for _, v := range vals {
			b.WriteString(name)
			b.WriteByte(':')
			b.WriteString(strings.TrimSpace(v))
			b.WriteByte('\n')
		}
	}
	b.WriteByte('\n')
	b.WriteString(strings.Join(signed, ";"))
	b.WriteByte('\n')
	b.WriteString(bodyHash(r.Header, body))

	crHash := sha256.Sum256([]byte(b.String()))
	sts := signAlgorithm + "\n" + date + "\n" + hex.EncodeToString(crHash[:])
	mac := hmac.New(sha256.New, []byte(sk))
	mac.Write([]byte(sts))
	return hex.EncodeToString(mac.Sum(nil))
}

// headerValues finds a header by its lower-cased name, whatever case it was
// stored under (net/http canonicalises, but a caller may set the map directly).
func headerValues(h http.Header, lower string) []string {
	var out []string
	for k, v := range h {
		if strings.ToLower(k) == lower {
			out = append(out, v...)
		}
	}
	return out
}

func bodyHash(h http.Header, body []byte) string {
	if v := h.Get(HeaderContentSha256); v != "" {
		return v
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
	segs := strings.Split(path, "/")
	for i, s := range segs {
		segs[i] = EscapePathSegment(s)
	}
	out := strings.Join(segs, "/")
	if !strings.HasSuffix(out, "/") {
		out += "/"
	}
	return out
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
	n := 0
	for i := 0; i < len(s); i++ {
		if !unreserved(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hexDigits = "0123456789ABCDEF"
	t := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if unreserved(c) {
			t = append(t, c)
			continue
		}
		t = append(t, '%', hexDigits[c>>4], hexDigits[c&15])
	}
	return string(t)
}
