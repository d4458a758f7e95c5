package natsconn

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/dlf-stop/worker/internal/secretfile"
)

// The files nats.go would read again by itself at every connect and
// reconnect (NATS_CREDS, NATS_NKEY, NATS_CA, NATS_CERT and NATS_KEY) are
// read here instead, through secretfile.ReadRegular, in the callbacks
// nats.go offers for them. nats.go reads them with os.ReadFile inside its
// reconnect, holding the connection's lock: a path that turned into a FIFO
// while the worker runs would hang that read, and with it every publish,
// ack and the shutdown. Read here, such a file fails that connect, with an
// error naming the path, and the next attempt reads it again. Like
// nats.go, the seeds are not kept in memory between connects.

// readFile reads a regular file; its errors name the path and never hold
// the contents.
func readFile(path string) ([]byte, error) {
	b, err := secretfile.ReadRegular(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, fmt.Errorf("read %q: %v", path, err)
	}
	return b, nil
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 'x'
	}
}

// keyPair reads the nkey seed in path (a creds file or a bare seed).
func keyPair(path string) (nkeys.KeyPair, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	defer wipe(b)
	kp, err := nkeys.ParseDecoratedNKey(b)
	if err != nil {
		return nil, fmt.Errorf("%q holds no nkey seed", path)
	}
	return kp, nil
}

// sign signs the server's nonce with the seed in path.
func sign(path string, nonce []byte) ([]byte, error) {
	kp, err := keyPair(path)
	if err != nil {
		return nil, err
	}
	defer kp.Wipe()
	return kp.Sign(nonce)
}

// credsOption authenticates with the user JWT and seed of a creds file,
// both read now once so that a bad file is reported at start.
func credsOption(path string) (nats.Option, error) {
	userJWT := func() (string, error) {
		b, err := readFile(path)
		if err != nil {
			return "", err
		}
		defer wipe(b)
		// nkeys returns the whole text when it finds no JWT block: a bare
		// seed would go to the server as the JWT.
		if !bytes.Contains(b, []byte("-----BEGIN NATS USER JWT-----")) {
			return "", fmt.Errorf("%q holds no user JWT (a creds file has a NATS USER JWT block and a seed)", path)
		}
		token, err := nkeys.ParseDecoratedJWT(b)
		if err != nil {
			return "", fmt.Errorf("%q holds no user JWT", path)
		}
		// The server answers an expired JWT with a bare "authorization
		// violation", as it does a wrong account (found by review).
		claims, err := jwt.DecodeUserClaims(token)
		if err != nil {
			return "", fmt.Errorf("%q holds no readable user JWT: %v", path, err)
		}
		if claims.Expires != 0 && time.Now().Unix() >= claims.Expires {
			return "", fmt.Errorf("the user JWT in %q expired at %s", path,
				time.Unix(claims.Expires, 0).UTC().Format(time.RFC3339))
		}
		return token, nil
	}
	token, err := userJWT()
	if err != nil {
		return nil, err
	}
	kp, err := keyPair(path)
	if err != nil {
		return nil, err
	}
	pub, err := kp.PublicKey()
	kp.Wipe()
	if err != nil {
		return nil, fmt.Errorf("%q holds no user nkey seed", path)
	}
	// Public keys only: neither is a secret.
	if claims, err := jwt.DecodeUserClaims(token); err == nil && claims.Subject != pub {
		return nil, fmt.Errorf("the seed in %q is not the key of its user JWT (the JWT is for %s, the seed signs as %s)",
			path, claims.Subject, pub)
	}
	return nats.UserJWT(userJWT, func(nonce []byte) ([]byte, error) { return sign(path, nonce) }), nil
}

// nkeyOption authenticates with the nkey seed in path; its public key is
// read once, now.
func nkeyOption(path string) (nats.Option, error) {
	kp, err := keyPair(path)
	if err != nil {
		return nil, err
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil || !nkeys.IsValidPublicUserKey(pub) {
		return nil, fmt.Errorf("%q holds no user nkey seed", path)
	}
	return nats.Nkey(pub, func(nonce []byte) ([]byte, error) { return sign(path, nonce) }), nil
}

// rootCAs returns the pool of the CA certificates in path.
func rootCAs(path string) nats.RootCAsHandler {
	return func() (*x509.CertPool, error) {
		b, err := readFile(path)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%q holds no PEM certificate", path)
		}
		return pool, nil
	}
}

// clientCert returns the client certificate in certPath with its key in
// keyPath.
func clientCert(certPath, keyPath string) nats.TLSCertHandler {
	return func() (tls.Certificate, error) {
		certPEM, err := readFile(certPath)
		if err != nil {
			return tls.Certificate{}, err
		}
		keyPEM, err := readFile(keyPath)
		if err != nil {
			return tls.Certificate{}, err
		}
		defer wipe(keyPEM)
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("%q and %q hold no certificate and matching key: %v", certPath, keyPath, err)
		}
		return cert, nil
	}
}
