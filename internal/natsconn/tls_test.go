package natsconn

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/dlf-stop/worker/internal/config"
)

// pki is a CA that issues certificates into PEM files.
type pki struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	caFile string
	pool   *x509.CertPool
	dir    string
}

// serial numbers the certificates; parallel tests issue them too.
var serial atomic.Int64

// newCert gives tmpl what the CA and the certificates it issues have in
// common (a serial of its own, the name, an hour of validity either side of
// now) and signs it for a new key: with parentKey under parent, or with the
// new key itself when parent is nil, as for the CA.
func newCert(t *testing.T, name string, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(serial.Add(1))
	tmpl.Subject = pkix.Name{CommonName: name}
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	der, key := newCert(t, name, &x509.Certificate{
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}, nil, nil)
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
	der, key := newCert(t, name, &x509.Certificate{
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{usage},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}, p.cert, p.key)
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
	// No CA at all: the system roots do not hold the test CA either, and
	// there must be no fallback to skipping verification.
	connectAndCheck(t, config.NATS{URL: serverURL(s)}, "certificate signed by unknown authority")
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
