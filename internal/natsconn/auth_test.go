package natsconn

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
	"github.com/dlf-stop/worker/internal/testutil/natsjwt"
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
	good, pub := natsjwt.NewKey(t, nkeys.CreateUser)
	bad, _ := natsjwt.NewKey(t, nkeys.CreateUser)
	s := runServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	dir := t.TempDir()
	goodFile, goodSeed := seedFile(t, dir, "good.nk", good)
	badFile, badSeed := seedFile(t, dir, "bad.nk", bad)
	notSeed := writeFile(t, dir, "not-a-seed.nk", []byte("this is not a seed\n"))

	connectAndCheck(t, config.NATS{URL: serverURL(s), NKey: goodFile}, "", goodSeed, badSeed)
	connectAndCheck(t, config.NATS{URL: serverURL(s), NKey: badFile}, "authorization violation", goodSeed, badSeed)

	_, err := Connect(context.Background(), config.NATS{URL: serverURL(s), NKey: notSeed}, zap.NewNop(), "t")
	if err == nil || !strings.HasPrefix(err.Error(), "connect nats: NATS_NKEY: ") {
		t.Fatalf("Connect with a file that is not a seed: %v, want a NATS_NKEY error", err)
	}
}

func TestCreds(t *testing.T) {
	op := natsjwt.NewOperator(t)
	known := op.Account(t, true, false)
	unknown := op.Account(t, false, false)
	opts := &server.Options{}
	op.Configure(t, opts)
	s := runServer(t, opts)
	dir := t.TempDir()
	other, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	goodFile, goodSeed := natsjwt.Creds(t, dir, "good.creds", known, nil)
	unknownFile, unknownSeed := natsjwt.Creds(t, dir, "unknown-account.creds", unknown, nil)
	wrongSeedFile, wrongSeed := natsjwt.Creds(t, dir, "wrong-seed.creds", known, other)
	// nkeys reads a file without a JWT block as one JWT: the seed would
	// go to the server in CONNECT (found by review).
	bareFile, bareSeed := seedFile(t, dir, "bare-seed.creds", other)
	expiredFile, expiredSeed := natsjwt.CredsWith(t, dir, "expired.creds", known, nil,
		func(c *jwt.UserClaims) { c.Expires = time.Now().Add(-time.Hour).Unix() })
	secrets := []string{goodSeed, unknownSeed, wrongSeed, bareSeed, expiredSeed}

	tests := []struct {
		name    string
		file    string
		wantErr string
	}{
		{"right creds", goodFile, ""},
		{"account unknown to the server", unknownFile, "authorization violation"},
		// The server says only "authorization violation" to both (found
		// by review); the worker names them.
		{"seed does not match the JWT", wrongSeedFile, "NATS_CREDS: the seed in"},
		{"expired", expiredFile, "NATS_CREDS: the user JWT in"},
		{"a bare seed, no JWT", bareFile, "NATS_CREDS: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			connectAndCheck(t, config.NATS{URL: serverURL(s), Creds: tt.file}, tt.wantErr, secrets...)
		})
	}
}
