// Package natsconn turns config.NATS into a NATS connection: authentication
// (user/password, token, creds file, nkey seed file), TLS (trusted CAs and a
// client certificate), reconnecting forever, and logging of connection
// events without secrets.
//
// NATS_PASSWORD_FILE is read through nats.go's user-info callback, so the
// file is read again at every connect and reconnect: a rotated password
// (rewritten in place or swapped by Kubernetes) is picked up at the next
// reconnect without a restart. When the file cannot be read the last password
// read is used and a warning logged. Creds and nkey seed files are read by
// nats.go at every connect as well; CA and client certificate files are read
// when the connection is set up.
//
// The initial connect does not retry: Connect returns an error when no server
// accepts the connection, and the caller decides (the worker exits and is
// restarted). Once connected, the connection reconnects forever, also
// after the server refused its credentials (they are read again at every
// attempt).
package natsconn

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/secretfile"
)

// Connection tuning. ReconnectWait is the pause between reconnect attempts
// to one server (nats.go adds up to 100ms of jitter, 1s with TLS).
const (
	ReconnectWait  = 2 * time.Second
	ConnectTimeout = 5 * time.Second
	// A link that loses the server without a reset is given up after
	// PingInterval times MaxPingsOut (20 to 30 s), within JetStream's
	// default ack wait of 30 s: the heartbeats of held commands go
	// nowhere meanwhile.
	PingInterval = 10 * time.Second
	MaxPingsOut  = 2
	// WriteTimeout bounds one write to the server's socket. A server that
	// stops reading (wedged, or a link that drops packets) lets the
	// kernel's buffers fill, and every publish then blocks in that
	// write: nats.go's default, a minute, held a call's "sent" mark, and
	// the call, that long. After WriteTimeout the connection is given up
	// and reconnects. nats-server gives its own writes to a client the
	// same 10 s (write_deadline).
	WriteTimeout = 10 * time.Second
)

// Options returns the nats.go options for c: name, authentication, TLS,
// reconnecting forever every ReconnectWait, and handlers that log
// disconnects, reconnects and asynchronous errors at warn level without
// secrets. c is validated first; the password, nkey, CA and client
// certificate files are read here once so a problem surfaces now, as an
// error naming the variable, and again at every connect (files.go).
func Options(c config.NATS, log *zap.Logger, name string) ([]nats.Option, error) {
	opts, _, err := options(c, log, name)
	return opts, err
}

func options(c config.NATS, log *zap.Logger, name string) ([]nats.Option, *redactor, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if err := c.Validate(); err != nil {
		return nil, nil, err
	}
	r := newRedactor(c)
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		// Without it nats.go closes the connection for good once one
		// server refuses two reconnects in a row: a password changed at
		// the server before the kubelet has rewritten NATS_PASSWORD_FILE,
		// or a creds file renewed late, would leave the worker connected
		// to nothing for ever.
		nats.IgnoreAuthErrorAbort(),
		nats.ReconnectWait(ReconnectWait),
		nats.Timeout(ConnectTimeout),
		nats.PingInterval(PingInterval),
		nats.MaxPingsOutstanding(MaxPingsOut),
		nats.FlusherTimeout(WriteTimeout),
	}
	opts = append(opts, handlers(log, r)...)

	auth, err := authOption(c, log, r)
	if err != nil {
		return nil, nil, err
	}
	if auth != nil {
		opts = append(opts, auth)
	}

	// The CA and the client certificate are read at every connect (see
	// files.go); read once now, a bad file is reported at start, named.
	var caCB nats.RootCAsHandler
	var certCB nats.TLSCertHandler
	if c.CA != "" {
		caCB = rootCAs(c.CA)
		if _, err := caCB(); err != nil {
			return nil, nil, fmt.Errorf("NATS_CA: %s", r.scrub(err.Error()))
		}
	}
	if c.Cert != "" {
		certCB = clientCert(c.Cert, c.Key)
		if _, err := certCB(); err != nil {
			return nil, nil, fmt.Errorf("NATS_CERT, NATS_KEY: %s", r.scrub(err.Error()))
		}
	}
	if caCB != nil || certCB != nil {
		opts = append(opts, nats.ClientTLSConfig(certCB, caCB))
	}
	return opts, r, nil
}

func authOption(c config.NATS, log *zap.Logger, r *redactor) (nats.Option, error) {
	switch {
	case c.PasswordFile != "":
		pw, err := readSecretFile(c.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("NATS_PASSWORD_FILE: %w", err)
		}
		r.add(pw)
		pf := &passwordFile{path: c.PasswordFile, last: pw, log: log, r: r}
		return nats.UserInfoHandler(func() (string, string) {
			return c.User, pf.read()
		}), nil
	case c.User != "":
		return nats.UserInfo(c.User, c.Password), nil
	case c.Token != "":
		return nats.Token(c.Token), nil
	case c.Creds != "":
		o, err := credsOption(c.Creds)
		if err != nil {
			return nil, fmt.Errorf("NATS_CREDS: %s", r.scrub(err.Error()))
		}
		return o, nil
	case c.NKey != "":
		o, err := nkeyOption(c.NKey)
		if err != nil {
			return nil, fmt.Errorf("NATS_NKEY: %s", r.scrub(err.Error()))
		}
		return o, nil
	}
	return nil, nil
}

// passwordFile reads NATS_PASSWORD_FILE at every (re)connect.
type passwordFile struct {
	path string
	log  *zap.Logger
	r    *redactor

	mu   sync.Mutex
	last string
}

func (p *passwordFile) read() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	pw, err := readSecretFile(p.path)
	if err != nil {
		p.log.Warn("read NATS_PASSWORD_FILE failed; using the password read before", zap.String("error", err.Error()))
		return p.last
	}
	p.r.add(pw)
	p.last = pw
	return pw
}

// readSecretFile returns the trimmed contents of path. Its errors name the
// path and never hold the contents.
func readSecretFile(path string) (string, error) {
	// A FIFO or a huge file must not make this wait: it runs inside
	// nats.go's reconnect, holding the connection's lock.
	b, err := secretfile.ReadRegular(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return "", fmt.Errorf("read %q: %v", path, err)
	}
	s := secretfile.Trim(b)
	if s == "" {
		return "", fmt.Errorf("%q is empty", path)
	}
	return s, nil
}

func handlers(log *zap.Logger, r *redactor) []nats.Option {
	errField := func(err error) zap.Field {
		if err == nil {
			return zap.Skip()
		}
		return zap.String("error", r.scrub(err.Error()))
	}
	return []nats.Option{
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if nc.IsClosed() {
				return // Close was called; ClosedHandler logs it.
			}
			log.Warn("nats disconnected; reconnecting", errField(err))
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Warn("nats reconnected",
				zap.String("url", config.RedactURL(nc.ConnectedUrl())),
				zap.String("server_id", nc.ConnectedServerId()),
				zap.Uint64("reconnects", nc.Stats().Reconnects))
		}),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn("nats reconnect attempt failed", errField(err))
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			fields := []zap.Field{errField(err)}
			if sub != nil {
				fields = append(fields, zap.String("subject", sub.Subject))
			}
			log.Warn("nats error", fields...)
		}),
		nats.LameDuckModeHandler(func(nc *nats.Conn) {
			log.Warn("nats server entering lame duck mode; will reconnect to another server",
				zap.String("server_id", nc.ConnectedServerId()))
		}),
		nats.ClosedHandler(func(nc *nats.Conn) {
			log.Info("nats connection closed", errField(nc.LastError()))
		}),
	}
}

// Connect connects to c.URL with Options. It does not retry the first
// connect. Cancelling ctx aborts the connect (dial, TLS handshake and
// protocol handshake) and returns ctx's error; once Connect has returned,
// ctx no longer matters. Errors start with "connect nats: ", name the
// problem and the servers, and hold no secret (URLs are shown without their
// user information); errors.Is works with nats.go's errors such as
// nats.ErrAuthorization.
func Connect(ctx context.Context, c config.NATS, log *zap.Logger, name string) (*nats.Conn, error) {
	if log == nil {
		log = zap.NewNop()
	}
	opts, r, err := options(c, log, name)
	if err != nil {
		return nil, fmt.Errorf("connect nats: %w", settingsError{err})
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("connect nats: %w", err)
	}
	d := newDialer(ctx, ConnectTimeout)
	opts = append(opts, nats.SetCustomDialer(d))
	nc, err := nats.Connect(c.URL, opts...)
	cancelled := d.release()
	if cancelled || ctx.Err() != nil {
		if nc != nil {
			nc.Close()
		}
		return nil, &connectError{
			msg: fmt.Sprintf("connect nats: %v (servers %s)", context.Cause(ctx), config.RedactURL(c.URL)),
			err: context.Cause(ctx),
		}
	}
	if err != nil {
		return nil, &connectError{
			msg: fmt.Sprintf("connect nats: %s%s (servers %s)", r.scrub(natsMessage(err)), tlsHint(err, c), config.RedactURL(c.URL)),
			err: err,
		}
	}
	log.Info("nats connected",
		zap.String("url", config.RedactURL(nc.ConnectedUrl())),
		zap.String("server_id", nc.ConnectedServerId()),
		zap.String("name", name))
	return nc, nil
}

// ErrSettings is wrapped by Connect's errors about settings that no
// retry can mend (a creds file whose JWT expired, a seed that is not its
// key, a file that holds no key): `worker stop` reports them as bad usage.
var ErrSettings = errors.New("unusable NATS settings")

type settingsError struct{ err error }

func (e settingsError) Error() string   { return e.err.Error() }
func (e settingsError) Unwrap() []error { return []error{e.err, ErrSettings} }

// connectError carries a message safe to show and the original error for
// errors.Is and errors.As.
type connectError struct {
	msg string
	err error
}

func (e *connectError) Error() string { return e.msg }
func (e *connectError) Unwrap() error { return e.err }

// tlsHint explains a TLS connection the server dropped right after the
// handshake: with TLS 1.3 that is how a refused client certificate looks to
// the client.
func tlsHint(err error, c config.NATS) string {
	msg := err.Error()
	if !strings.Contains(msg, "certificate required") && !strings.Contains(msg, "closed by remote after TLS handshake") &&
		!strings.Contains(msg, "bad certificate") && !strings.Contains(msg, "unknown certificate authority") {
		return ""
	}
	if c.Cert == "" {
		return "; the server may require a client certificate (NATS_CERT, NATS_KEY)"
	}
	return "; the server may not accept the client certificate (NATS_CERT)"
}

// authErrors are nats.go's errors for a refused login. The server's text
// differs in case ("Authorization Violation"); errors.Is matches either.
var authErrors = []error{
	nats.ErrAuthorization,
	nats.ErrAuthExpired,
	nats.ErrAuthRevoked,
	nats.ErrAccountAuthExpired,
}

// natsMessage is err's message without nats.go's "nats: " prefix, which
// "connect nats: " already says, and with refused logins worded the same
// way whatever the server sent.
func natsMessage(err error) string {
	for _, ae := range authErrors {
		if errors.Is(err, ae) {
			err = ae
			break
		}
	}
	return strings.TrimPrefix(err.Error(), "nats: ")
}
