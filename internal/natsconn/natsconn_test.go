package natsconn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dlf-stop/worker/internal/config"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		// The auth matrix figure: every connect the tests made, by method
		// (the top-level test) and result.
		matrix.Lock()
		fmt.Printf("auth_matrix accepted=%d refused=%d by_test=%v\n", matrix.accepted, matrix.refused, matrix.byTest)
		matrix.Unlock()
		os.Exit(code)
	}))
}

var matrix struct {
	sync.Mutex
	accepted, refused int
	byTest            map[string]string
}

func countConnect(t *testing.T, accepted bool) {
	name, _, _ := strings.Cut(t.Name(), "/")
	matrix.Lock()
	defer matrix.Unlock()
	if matrix.byTest == nil {
		matrix.byTest = map[string]string{}
	}
	if accepted {
		matrix.accepted++
		matrix.byTest[name] += "+"
	} else {
		matrix.refused++
		matrix.byTest[name] += "-"
	}
}

// runServer starts an embedded NATS server on a random loopback port (or
// opts.Port) and shuts it down when the test ends.
func runServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	opts.Host = "127.0.0.1"
	if opts.Port == 0 {
		opts.Port = -1
	}
	opts.NoLog = true
	opts.NoSigs = true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("new server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatal("server not ready")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

func serverURL(s *server.Server) string {
	return fmt.Sprintf("nats://%s", s.Addr().String())
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

func writeFile(t *testing.T, dir, name string, content []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// connectAndCheck connects with c and checks the outcome: wantErr "" means
// success (the connection is then used and closed); otherwise the error must
// contain wantErr, start with "connect nats: " and contain none of secrets.
func connectAndCheck(t *testing.T, c config.NATS, wantErr string, secrets ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// An observer, not zaptest: the closed handler may log after the test.
	core, logs := observer.New(zapcore.DebugLevel)
	defer func() {
		for _, e := range logs.All() {
			line := fmt.Sprint(e.Message, " ", e.ContextMap())
			for _, s := range secrets {
				if s != "" && strings.Contains(line, s) {
					t.Errorf("log entry holds a secret: %s", line)
				}
			}
		}
	}()
	nc, err := Connect(ctx, c, zap.New(core), "natsconn-test")
	if wantErr == "" {
		if err != nil {
			t.Fatalf("Connect: %v", err)
		}
		defer nc.Close()
		if err := nc.Publish("hello", []byte("x")); err != nil {
			t.Fatalf("publish: %v", err)
		}
		if err := nc.FlushWithContext(ctx); err != nil {
			t.Fatalf("flush: %v", err)
		}
		if logs.FilterMessage("nats connected").Len() != 1 {
			t.Errorf("connect not logged: %v", logs.All())
		}
		countConnect(t, true)
		return
	}
	if err == nil {
		nc.Close()
		t.Fatalf("Connect succeeded, want error containing %q", wantErr)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "connect nats: ") {
		t.Errorf("error %q does not start with %q", msg, "connect nats: ")
	}
	if !strings.Contains(msg, wantErr) {
		t.Errorf("error %q does not contain %q", msg, wantErr)
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(msg, s) {
			t.Errorf("error %q contains the secret %q", msg, s)
		}
	}
	countConnect(t, false)
	t.Logf("refused as expected: %v", err)
}

const (
	goodPassword = "correct-horse-battery-staple"
	badPassword  = "wrong-password-value"
	goodToken    = "s3cr3t-token-0123456789"
	badToken     = "bad-token-9876543210"
)

func TestUserPassword(t *testing.T) {
	s := runServer(t, &server.Options{Username: "worker", Password: goodPassword})
	dir := t.TempDir()
	goodFile := writeFile(t, dir, "good", []byte(goodPassword+"\n"))
	badFile := writeFile(t, dir, "bad", []byte(badPassword))
	tests := []struct {
		name    string
		c       config.NATS
		wantErr string
	}{
		{"right password", config.NATS{URL: serverURL(s), User: "worker", Password: goodPassword}, ""},
		{"wrong password", config.NATS{URL: serverURL(s), User: "worker", Password: badPassword}, "authorization violation"},
		{"wrong user", config.NATS{URL: serverURL(s), User: "other", Password: goodPassword}, "authorization violation"},
		{"no credentials", config.NATS{URL: serverURL(s)}, "authorization violation"},
		{"right password file", config.NATS{URL: serverURL(s), User: "worker", PasswordFile: goodFile}, ""},
		{"wrong password file", config.NATS{URL: serverURL(s), User: "worker", PasswordFile: badFile}, "authorization violation"},
		{"wrong password in URL", config.NATS{URL: "nats://worker:" + badPassword + "@" + s.Addr().String()}, "authorization violation"},
		{"right password in URL", config.NATS{URL: "nats://worker:" + goodPassword + "@" + s.Addr().String()}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			connectAndCheck(t, tt.c, tt.wantErr, goodPassword, badPassword)
		})
	}
}

func TestErrorRedactsURL(t *testing.T) {
	s := runServer(t, &server.Options{Username: "worker", Password: goodPassword})
	url := "nats://worker:" + badPassword + "@" + s.Addr().String()
	_, err := Connect(context.Background(), config.NATS{URL: url}, zap.NewNop(), "t")
	if err == nil {
		t.Fatal("Connect succeeded")
	}
	want := fmt.Sprintf("connect nats: authorization violation (servers nats://[redacted]@%s)", s.Addr())
	if err.Error() != want {
		t.Fatalf("error = %q, want %q", err, want)
	}
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("errors.Is(err, nats.ErrAuthorization) = false for %v", err)
	}
}

func TestToken(t *testing.T) {
	s := runServer(t, &server.Options{Authorization: goodToken})
	tests := []struct {
		name    string
		c       config.NATS
		wantErr string
	}{
		{"right token", config.NATS{URL: serverURL(s), Token: goodToken}, ""},
		{"wrong token", config.NATS{URL: serverURL(s), Token: badToken}, "authorization violation"},
		{"wrong token in URL", config.NATS{URL: "nats://" + badToken + "@" + s.Addr().String()}, "authorization violation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			connectAndCheck(t, tt.c, tt.wantErr, goodToken, badToken)
		})
	}
}

func seedFile(t *testing.T, dir, name string, kp nkeys.KeyPair) (path string, seed string) {
	t.Helper()
	s, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, dir, name, s), string(s)
}

func TestNKey(t *testing.T) {
	good, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	bad, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := good.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	s := runServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	dir := t.TempDir()
	goodFile, goodSeed := seedFile(t, dir, "good.nk", good)
	badFile, badSeed := seedFile(t, dir, "bad.nk", bad)
	notSeed := writeFile(t, dir, "not-a-seed.nk", []byte("this is not a seed\n"))

	connectAndCheck(t, config.NATS{URL: serverURL(s), NKey: goodFile}, "", goodSeed, badSeed)
	connectAndCheck(t, config.NATS{URL: serverURL(s), NKey: badFile}, "authorization violation", goodSeed, badSeed)

	_, err = Connect(context.Background(), config.NATS{URL: serverURL(s), NKey: notSeed}, zap.NewNop(), "t")
	if err == nil || !strings.HasPrefix(err.Error(), "connect nats: NATS_NKEY: ") {
		t.Fatalf("Connect with a file that is not a seed: %v, want a NATS_NKEY error", err)
	}
}

// operator is an operator/account/user JWT chain for a server in operator
// mode with a memory resolver.
type operator struct {
	claims   *jwt.OperatorClaims
	resolver *server.MemAccResolver
	opKP     nkeys.KeyPair
}

// newKey creates a key pair of one kind and returns it with its public key.
func newKey(t *testing.T, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := create()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return kp, pub
}

func newOperator(t *testing.T) *operator {
	t.Helper()
	opKP, opPub := newKey(t, nkeys.CreateOperator)
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "test-operator"
	ojwt, err := oc.Encode(opKP)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := jwt.DecodeOperatorClaims(ojwt)
	if err != nil {
		t.Fatal(err)
	}
	return &operator{claims: claims, resolver: &server.MemAccResolver{}, opKP: opKP}
}

// account creates an account signed by the operator; register stores it in
// the resolver so the server knows it.
func (o *operator) account(t *testing.T, register bool) nkeys.KeyPair {
	t.Helper()
	kp, pub := newKey(t, nkeys.CreateAccount)
	ac := jwt.NewAccountClaims(pub)
	ac.Name = "test-account"
	ajwt, err := ac.Encode(o.opKP)
	if err != nil {
		t.Fatal(err)
	}
	if register {
		if err := o.resolver.Store(pub, ajwt); err != nil {
			t.Fatal(err)
		}
	}
	return kp
}

// creds writes a .creds file for a new user of account and returns its
// path and seed. With a non-nil seedOf, the file holds that key pair's seed
// instead of the user's own.
func creds(t *testing.T, dir, name string, account nkeys.KeyPair, seedOf nkeys.KeyPair) (string, string) {
	t.Helper()
	ukp, upub := newKey(t, nkeys.CreateUser)
	uc := jwt.NewUserClaims(upub)
	uc.Name = "test-user"
	ujwt, err := uc.Encode(account)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := ukp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	b, err := jwt.FormatUserConfig(ujwt, seed)
	if err != nil {
		t.Fatal(err)
	}
	if seedOf != nil {
		// FormatUserConfig refuses a seed that does not match the JWT, so
		// swap it in afterwards.
		other, err := seedOf.Seed()
		if err != nil {
			t.Fatal(err)
		}
		b = []byte(strings.Replace(string(b), string(seed), string(other), 1))
		seed = other
	}
	return writeFile(t, dir, name, b), string(seed)
}

func TestCreds(t *testing.T) {
	op := newOperator(t)
	known := op.account(t, true)
	unknown := op.account(t, false)
	s := runServer(t, &server.Options{
		TrustedOperators: []*jwt.OperatorClaims{op.claims},
		AccountResolver:  op.resolver,
	})
	dir := t.TempDir()
	other, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	goodFile, goodSeed := creds(t, dir, "good.creds", known, nil)
	unknownFile, unknownSeed := creds(t, dir, "unknown-account.creds", unknown, nil)
	wrongSeedFile, wrongSeed := creds(t, dir, "wrong-seed.creds", known, other)
	secrets := []string{goodSeed, unknownSeed, wrongSeed}

	tests := []struct {
		name    string
		file    string
		wantErr string
	}{
		{"right creds", goodFile, ""},
		{"account unknown to the server", unknownFile, "authorization violation"},
		{"seed does not match the JWT", wrongSeedFile, "authorization violation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			connectAndCheck(t, config.NATS{URL: serverURL(s), Creds: tt.file}, tt.wantErr, secrets...)
		})
	}
}

// pki is a CA that issues certificates into PEM files.
type pki struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	caFile string
	pool   *x509.CertPool
	dir    string
}

var serial int64

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &pki{
		cert:   cert,
		key:    key,
		caFile: writeFile(t, dir, name+"-ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		pool:   pool,
		dir:    dir,
	}
}

// issue returns a certificate and key (as tls.Certificate and as PEM files).
func (p *pki) issue(t *testing.T, name string, usage x509.ExtKeyUsage) (tls.Certificate, string, string, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	tc, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return tc, writeFile(t, p.dir, name+".pem", certPEM), writeFile(t, p.dir, name+"-key.pem", keyPEM), string(keyPEM)
}

func TestTLS(t *testing.T) {
	ca := newPKI(t, "trusted")
	untrusted := newPKI(t, "untrusted")
	serverCert, _, _, _ := ca.issue(t, "server", x509.ExtKeyUsageServerAuth)
	s := runServer(t, &server.Options{
		TLSConfig:  &tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12},
		TLSTimeout: 5,
	})
	connectAndCheck(t, config.NATS{URL: serverURL(s), CA: ca.caFile}, "")
	connectAndCheck(t, config.NATS{URL: "tls://" + s.Addr().String(), CA: ca.caFile}, "")
	connectAndCheck(t, config.NATS{URL: serverURL(s), CA: untrusted.caFile}, "certificate signed by unknown authority")
}

func TestMutualTLS(t *testing.T) {
	ca := newPKI(t, "trusted")
	other := newPKI(t, "other")
	serverCert, _, _, _ := ca.issue(t, "server", x509.ExtKeyUsageServerAuth)
	_, certFile, keyFile, keyPEM := ca.issue(t, "client", x509.ExtKeyUsageClientAuth)
	_, otherCert, otherKey, otherKeyPEM := other.issue(t, "stranger", x509.ExtKeyUsageClientAuth)
	s := runServer(t, &server.Options{
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{serverCert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    ca.pool,
			MinVersion:   tls.VersionTLS12,
		},
		TLSVerify:  true,
		TLSTimeout: 5,
	})
	tests := []struct {
		name    string
		c       config.NATS
		wantErr string
	}{
		{"client certificate", config.NATS{URL: serverURL(s), CA: ca.caFile, Cert: certFile, Key: keyFile}, ""},
		{"no client certificate", config.NATS{URL: serverURL(s), CA: ca.caFile}, "the server may require a client certificate (NATS_CERT, NATS_KEY)"},
		{"client certificate from another CA", config.NATS{URL: serverURL(s), CA: ca.caFile, Cert: otherCert, Key: otherKey}, "the server may not accept the client certificate (NATS_CERT)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			connectAndCheck(t, tt.c, tt.wantErr, keyPEM, otherKeyPEM)
		})
	}
}

func TestOptionsBadFiles(t *testing.T) {
	dir := t.TempDir()
	junk := writeFile(t, dir, "junk.pem", []byte("not a certificate\n"))
	missing := filepath.Join(dir, "missing")
	tests := []struct {
		name string
		c    config.NATS
		want string
	}{
		{"CA not PEM", config.NATS{URL: config.DefaultNATSURL, CA: junk}, "NATS_CA: "},
		{"cert not PEM", config.NATS{URL: config.DefaultNATSURL, Cert: junk, Key: junk}, "NATS_CERT, NATS_KEY: "},
		{"CA missing", config.NATS{URL: config.DefaultNATSURL, CA: missing}, "NATS_CA: cannot open"},
		{"password file missing", config.NATS{URL: config.DefaultNATSURL, User: "u", PasswordFile: missing}, "NATS_PASSWORD_FILE: cannot open"},
		{"two methods", config.NATS{URL: config.DefaultNATSURL, Token: goodToken, User: "u", Password: goodPassword}, "NATS_USER, NATS_TOKEN: set only one"},
		{"bad URL", config.NATS{URL: "http://u:" + goodPassword + "@h:1"}, "NATS_URL: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Options(tt.c, zap.NewNop(), "t")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Options error = %v, want it to contain %q", err, tt.want)
			}
			for _, s := range []string{goodPassword, goodToken} {
				if strings.Contains(err.Error(), s) {
					t.Fatalf("error %q contains a secret", err)
				}
			}
		})
	}
}

func TestOptionsReconnectForever(t *testing.T) {
	opts, err := Options(config.NATS{URL: config.DefaultNATSURL}, nil, "my-worker")
	if err != nil {
		t.Fatal(err)
	}
	o := nats.GetDefaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			t.Fatal(err)
		}
	}
	if o.MaxReconnect != -1 || !o.AllowReconnect || o.ReconnectWait != ReconnectWait || o.Name != "my-worker" {
		t.Fatalf("MaxReconnect=%d AllowReconnect=%v ReconnectWait=%s Name=%q", o.MaxReconnect, o.AllowReconnect, o.ReconnectWait, o.Name)
	}
	if o.DisconnectedErrCB == nil || o.ReconnectedCB == nil || o.AsyncErrorCB == nil || o.ClosedCB == nil || o.ReconnectErrCB == nil {
		t.Fatal("a connection event handler is missing")
	}
}

// TestPasswordFileRotation restarts the server with a new password: the
// client, which reads NATS_PASSWORD_FILE at every reconnect, gets back in
// with the rotated file, and nothing it logs holds a password.
func TestPasswordFileRotation(t *testing.T) {
	const oldPassword, newPassword = "old-password-0001", "new-password-0002"
	s1, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true, Username: "worker", Password: oldPassword})
	if err != nil {
		t.Fatal(err)
	}
	go s1.Start()
	if !s1.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() { s1.Shutdown(); s1.WaitForShutdown() })
	port := s1.Addr().(*net.TCPAddr).Port

	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", []byte(oldPassword+"\n"))
	core, logs := observer.New(zapcore.DebugLevel)
	nc, err := Connect(context.Background(), config.NATS{URL: serverURL(s1), User: "worker", PasswordFile: pwFile}, zap.New(core), "rotation")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	// Rotate the way Kubernetes does: write a new file, rename over the old.
	tmp := writeFile(t, dir, "password.new", []byte(newPassword))
	if err := os.Rename(tmp, pwFile); err != nil {
		t.Fatal(err)
	}
	s1.Shutdown()
	s1.WaitForShutdown()
	waitFor(t, 10*time.Second, "disconnect", func() bool { return !nc.IsConnected() })
	runServer(t, &server.Options{Port: port, Username: "worker", Password: newPassword})
	waitFor(t, 20*time.Second, "reconnect with the rotated password", func() bool {
		return nc.IsConnected() && nc.Stats().Reconnects >= 1
	})
	if err := nc.Flush(); err != nil {
		t.Fatalf("flush after reconnect: %v", err)
	}

	waitFor(t, 5*time.Second, "reconnect log", func() bool {
		return logs.FilterMessage("nats reconnected").Len() > 0
	})
	if logs.FilterMessage("nats disconnected; reconnecting").Len() == 0 {
		t.Error("no disconnect logged")
	}
	for _, e := range logs.All() {
		line := fmt.Sprint(e.Message, " ", e.ContextMap())
		for _, s := range []string{oldPassword, newPassword} {
			if strings.Contains(line, s) {
				t.Errorf("log entry holds a password: %s", line)
			}
		}
		if e.Message == "nats reconnected" || e.Message == "nats disconnected; reconnecting" {
			if e.Level != zapcore.WarnLevel {
				t.Errorf("%q logged at %s, want warn", e.Message, e.Level)
			}
		}
	}
}

func TestPasswordFileUnreadableKeepsLastPassword(t *testing.T) {
	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", []byte(goodPassword))
	core, logs := observer.New(zapcore.DebugLevel)
	r := newRedactor(config.NATS{})
	pf := &passwordFile{path: pwFile, last: goodPassword, log: zap.New(core), r: r}
	if err := os.Remove(pwFile); err != nil {
		t.Fatal(err)
	}
	if got := pf.read(); got != goodPassword {
		t.Fatalf("read() = %q, want the last password", got)
	}
	if logs.FilterMessage("read NATS_PASSWORD_FILE failed; using the password read before").Len() != 1 {
		t.Fatalf("no warning logged: %v", logs.All())
	}
}

func TestConnectContext(t *testing.T) {
	t.Run("already cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := Connect(ctx, config.NATS{URL: config.DefaultNATSURL}, zap.NewNop(), "t")
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
	t.Run("cancelled during the handshake", func(t *testing.T) {
		// A listener that accepts and never speaks: nats.go waits for the
		// server's INFO until the context ends.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		accepted := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				accepted <- c
			}
			close(accepted)
		}()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, err := Connect(ctx, config.NATS{URL: "nats://" + ln.Addr().String()}, zap.NewNop(), "t")
			done <- err
		}()
		c := <-accepted
		if c == nil {
			t.Fatal("no connection accepted")
		}
		defer c.Close()
		start := time.Now()
		cancel()
		err = <-done
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if !strings.HasPrefix(err.Error(), "connect nats: context canceled") {
			t.Fatalf("err = %q", err)
		}
		if d := time.Since(start); d >= ConnectTimeout {
			t.Fatalf("Connect returned %s after cancel, not at once", d)
		}
	})
	t.Run("no server", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, err = Connect(context.Background(), config.NATS{URL: "nats://" + addr}, zap.NewNop(), "t")
		if err == nil || err.Error() != "connect nats: no servers available for connection (servers nats://"+addr+")" {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestRedactor(t *testing.T) {
	r := newRedactor(config.NATS{
		URL:      "nats://alice:pa%24%24word@h:1, nats://tok3n-value@h:2",
		Password: "inline-password",
		Token:    "abc", // too short to scrub by value
	})
	tests := []struct{ in, want string }{
		{"bad inline-password here", "bad [redacted] here"},
		{`parse "nats://x:y@h:1": bad`, `parse "nats://[redacted]@h:1": bad`},
		{"pa$$word and pa%24%24word", "[redacted] and [redacted]"},
		{"tok3n-value", "[redacted]"},
		{"abc stays", "abc stays"},
	}
	for _, tt := range tests {
		if got := r.scrub(tt.in); got != tt.want {
			t.Errorf("scrub(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
