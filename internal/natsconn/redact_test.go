package natsconn

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/config"
)

// Passwords holding a character that ends the user information for a URL
// parser ('/', '?', '#') or an entry of the NATS_URL list (',').
var separatorPasswords = []struct{ url, secret string }{
	{"nats://worker:ab/cd@h:4222", "ab/cd"},
	{"nats://u:12/34@h", "12/34"},
	{"nats://u:p,q@h", "p,q"},
	{"nats://u:s3cr#et@h", "s3cr#et"},
}

func TestScrubURLPasswordWithSeparators(t *testing.T) {
	tests := []struct {
		url, secret string
		msg, want   string
	}{
		{
			"nats://worker:ab/cd@h:4222", "ab/cd",
			`parse "nats://worker:ab/cd@h:4222": invalid port ":ab" after host`,
			`parse "nats://[redacted]@h:4222": invalid port ":ab" after host`,
		},
		{
			"nats://u:12/34@h", "12/34",
			"dial nats://u:12/34@h failed; also tried nats://u:12/34@h",
			"dial nats://[redacted]@h failed; also tried nats://[redacted]@h",
		},
		{
			"nats://u:p,q@h", "p,q",
			"servers nats://u:p,q@h)",
			"servers nats://[redacted]@h)",
		},
		{
			// A parser stops at '#', so the error quotes only the start
			// of the password; that piece is scrubbed by value.
			"nats://u:s3cr#et@h", "s3cr",
			`parse "nats://u:s3cr": invalid port ":s3cr" after host`,
			`parse "nats://u:[redacted]": invalid port ":[redacted]" after host`,
		},
		{
			"u:long/pass@h:4222", "long",
			`refused "long/pass", then "long"`,
			`refused "[redacted]", then "[redacted]"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			got := newRedactor(config.NATS{URL: tt.url}).scrub(tt.msg)
			if got != tt.want {
				t.Errorf("scrub(%q) = %q, want %q", tt.msg, got, tt.want)
			}
			if strings.Contains(got, tt.secret) {
				t.Errorf("scrub(%q) = %q holds %q", tt.msg, got, tt.secret)
			}
		})
	}
}

func TestConnectErrorHidesURLPassword(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	type tc struct{ url, secret string }
	var tests []tc
	for _, p := range separatorPasswords {
		// Point every URL at the closed port so the connect fails at once.
		host := p.url[strings.LastIndex(p.url, "@")+1:]
		tests = append(tests, tc{strings.TrimSuffix(p.url, host) + addr, p.secret})
	}
	tests = append(tests,
		tc{"u:ab/cd@" + addr, "ab/cd"},
		tc{"nats://u:p,q@" + addr, "u:p"}, // nats.go's first entry, "nats://u:p"
		tc{"nats://" + addr + ", nats://u:12/34@" + addr, "12/34"},
	)
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			// "nats://u:12/34@..." parses with host "u" and port 12; bound
			// the wait should the resolver be slow to say "no such host".
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			nc, err := Connect(ctx, config.NATS{URL: tt.url}, zap.NewNop(), "t")
			if err == nil {
				nc.Close()
				t.Fatal("Connect succeeded")
			}
			msg := err.Error()
			if strings.Contains(msg, tt.secret) {
				t.Errorf("Connect error holds %q: %s", tt.secret, msg)
			}
			if !strings.HasPrefix(msg, "connect nats: ") || !strings.Contains(msg, "[redacted]") {
				t.Errorf("Connect error does not show the redacted URL: %s", msg)
			}
		})
	}
}
