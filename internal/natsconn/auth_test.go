package natsconn

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
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
