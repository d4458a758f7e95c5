package emulator

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/dlf-stop/worker/internal/dlf"
)

// MaxClockSkew is how far X-Sdk-Date may be from the emulator's clock, as
// the API gateway allows (dlf-api-facts.md, "AK/SK signing").
const MaxClockSkew = 15 * time.Minute

// Header names the emulator reads or writes.
const (
	HeaderRequestID     = "X-Request-Id"
	HeaderWorkspace     = "workspace"
	HeaderProjectID     = "X-Project-Id"
	HeaderAuthToken     = "X-Auth-Token"
	HeaderSecurityToken = "X-Security-Token"
	HeaderRetryAfter    = "Retry-After"
)

type credential struct {
	sk            string
	securityToken string // required when not empty
}

// authConfig is immutable once published; changes replace it whole.
type authConfig struct {
	creds map[string]credential // by AK; empty: no AK/SK checking
	token string                // empty: no token checking
}

func (a authConfig) withCredential(ak string, c credential) authConfig {
	m := make(map[string]credential, len(a.creds)+1)
	for k, v := range a.creds {
		m[k] = v
	}
	m[ak] = c
	a.creds = m
	return a
}

func (a *authConfig) enabled() bool { return len(a.creds) > 0 || a.token != "" }

// SetCredentials replaces, at runtime, every accepted AK/SK pair with this
// one (e.g. to test credential rotation); an empty ak turns AK/SK checking
// off. The token setting is kept.
func (e *Emulator) SetCredentials(ak, sk string) {
	e.authMu.Lock()
	defer e.authMu.Unlock()
	next := authConfig{token: e.auth.Load().token}
	if ak != "" {
		next = next.withCredential(ak, credential{sk: sk})
	}
	e.auth.Store(&next)
}

// SetAuthToken replaces, at runtime, the accepted X-Auth-Token; "" turns
// token checking off. The AK/SK setting is kept.
func (e *Emulator) SetAuthToken(token string) {
	e.authMu.Lock()
	defer e.authMu.Unlock()
	next := *e.auth.Load()
	next.token = token
	e.auth.Store(&next)
}

var (
	errNoAuth        = errors.New("no X-Auth-Token and no SDK-HMAC-SHA256 Authorization")
	errBadToken      = errors.New("X-Auth-Token is not valid")
	errNoProjectID   = errors.New(HeaderProjectID + " is missing")
	errSecurityToken = errors.New(HeaderSecurityToken + " is missing or not valid")
	errAKSKDisabled  = errors.New("AK/SK authentication is not enabled")
)

// authenticate returns nil when r may pass the (emulated) API gateway.
// The error text never holds a secret.
func (e *Emulator) authenticate(r *http.Request, body []byte) error {
	a := e.auth.Load()
	if !a.enabled() {
		return nil
	}
	if auth := r.Header.Get(dlf.HeaderAuthorization); auth != "" {
		if len(a.creds) == 0 {
			return errAKSKDisabled
		}
		return e.verifySigned(a, r, body, auth)
	}
	if tok := r.Header.Get(HeaderAuthToken); tok != "" {
		if a.token == "" || subtle.ConstantTimeCompare([]byte(tok), []byte(a.token)) != 1 {
			return errBadToken
		}
		return nil
	}
	return errNoAuth
}

func (e *Emulator) verifySigned(a *authConfig, r *http.Request, body []byte, auth string) error {
	var (
		cred    credential
		asked   string
		unknown bool
	)
	lookup := func(ak string) (string, bool) {
		c, ok := a.creds[ak]
		cred, asked, unknown = c, ak, !ok
		return c.sk, ok
	}
	vr := r
	// net/http moves Host out of r.Header; put it back when it was signed.
	if _, list, ok := strings.Cut(auth, "SignedHeaders="); ok {
		list, _, _ = strings.Cut(list, ",")
		for _, h := range strings.Split(list, ";") {
			if h == "host" {
				vr = r.Clone(r.Context())
				vr.Header.Set("Host", r.Host)
				break
			}
		}
	}
	if err := dlf.VerifyRequest(vr, body, lookup, e.now(), MaxClockSkew); err != nil {
		if unknown {
			// The API gateway's documented answer names the AK (what a
			// worker gets after the AK was deleted at IAM and before
			// its files follow): clients must keep it out of their logs.
			return fmt.Errorf("Get secretKey failed,ak:%s,err:ak not exist", asked)
		}
		return err
	}
	if cred.securityToken != "" &&
		subtle.ConstantTimeCompare([]byte(r.Header.Get(HeaderSecurityToken)), []byte(cred.securityToken)) != 1 {
		return errSecurityToken
	}
	if r.Header.Get(HeaderProjectID) == "" {
		return errNoProjectID
	}
	return nil
}
