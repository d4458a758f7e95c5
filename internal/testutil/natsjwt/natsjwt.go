package natsjwt

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

// Operator is an operator whose accounts a server in operator mode trusts.
type Operator struct {
	Claims   *jwt.OperatorClaims
	Resolver *server.MemAccResolver
	kp       nkeys.KeyPair
}

// NewKey creates a key pair of one kind and returns it with its public key.
func NewKey(t testing.TB, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
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

// NewOperator creates an operator with an empty memory resolver.
func NewOperator(t testing.TB) *Operator {
	t.Helper()
	kp, pub := NewKey(t, nkeys.CreateOperator)
	oc := jwt.NewOperatorClaims(pub)
	oc.Name = "test-operator"
	encoded, err := oc.Encode(kp)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := jwt.DecodeOperatorClaims(encoded)
	if err != nil {
		t.Fatal(err)
	}
	return &Operator{Claims: claims, Resolver: &server.MemAccResolver{}, kp: kp}
}

// Configure puts the server in operator mode for o, with a system account
// of its own (JetStream in operator mode does not start without one).
func (o *Operator) Configure(t testing.TB, opts *server.Options) {
	t.Helper()
	sys, err := o.Account(t, true, false).PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	opts.TrustedOperators = []*jwt.OperatorClaims{o.Claims}
	opts.AccountResolver = o.Resolver
	opts.SystemAccount = sys
}

// Account creates an account signed by the operator. register stores it in
// the resolver, so the server knows it; jetStream gives it JetStream
// without limits.
func (o *Operator) Account(t testing.TB, register, jetStream bool) nkeys.KeyPair {
	t.Helper()
	kp, pub := NewKey(t, nkeys.CreateAccount)
	ac := jwt.NewAccountClaims(pub)
	ac.Name = "test-account"
	if jetStream {
		ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	}
	encoded, err := ac.Encode(o.kp)
	if err != nil {
		t.Fatal(err)
	}
	if register {
		if err := o.Resolver.Store(pub, encoded); err != nil {
			t.Fatal(err)
		}
	}
	return kp
}

// Creds writes dir/name, a .creds file for a new user of account, and
// returns its path and seed. With a non-nil seedOf, the file holds that
// key pair's seed instead of the user's own (a file the server refuses).
func Creds(t testing.TB, dir, name string, account nkeys.KeyPair, seedOf nkeys.KeyPair) (path, seed string) {
	t.Helper()
	return CredsWith(t, dir, name, account, seedOf, nil)
}

// CredsWith is Creds with the user's claims changed by edit (when not nil)
// before they are signed: an expiry, say.
func CredsWith(t testing.TB, dir, name string, account nkeys.KeyPair, seedOf nkeys.KeyPair, edit func(*jwt.UserClaims)) (path, seed string) {
	t.Helper()
	ukp, upub := NewKey(t, nkeys.CreateUser)
	uc := jwt.NewUserClaims(upub)
	uc.Name = "test-user"
	if edit != nil {
		edit(uc)
	}
	encoded, err := uc.Encode(account)
	if err != nil {
		t.Fatal(err)
	}
	own, err := ukp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	b, err := jwt.FormatUserConfig(encoded, own)
	if err != nil {
		t.Fatal(err)
	}
	seed = string(own)
	if seedOf != nil {
		// FormatUserConfig refuses a seed that does not match the JWT, so
		// it is swapped in afterwards.
		other, err := seedOf.Seed()
		if err != nil {
			t.Fatal(err)
		}
		b = []byte(strings.Replace(string(b), seed, string(other), 1))
		seed = string(other)
	}
	path = filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, seed
}
