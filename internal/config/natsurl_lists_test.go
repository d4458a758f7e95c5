package config

import "testing"

// Lists an operator may give, accepted as they were before the check for
// user information read as a host came: an entry without user information
// before one with it, IPv6 hosts, percent-encoded passwords (found by
// review: the first form was refused).
func TestValidNATSURLListsAreAccepted(t *testing.T) {
	for _, u := range []string{
		"nats://[::1]:4222", "nats://user:pass@host", "nats://user:p%40s%2Fs%2C@host:4222",
		"nats://a:4222, nats://b:4222 , tls://c:4222", "tls://h:4222", "ws://host/path",
		"wss://host:443/nats/ws", "host1,host2:4222", "nats://tok@host", "nats://user:pass@[::1]:4222",
		"nats://u:p@h1:4222,nats://u:p@h2:4222", "nats://u:p@h1:4222,u:p@h2:4222", "u:p@h1:4222",
		"nats://u:p@h1:4222,h2:4222", "nats://h1:4222,u:p@h2:4222", "h1:4222, u:p@h2:4222",
	} {
		if _, err := FromEnv(lookupMap(env("NATS_URL", u))); err != nil {
			t.Errorf("FromEnv(%q): %v", u, err)
		}
	}
}
