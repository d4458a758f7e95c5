package dlf

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// faultyNet dials for real, but can make every connection it made fail its
// writes with ECONNRESET, having written nothing, and can refuse new dials:
// together, a kept-alive connection the peer has reset while DLF is down.
type faultyNet struct {
	failWrites  atomic.Bool
	refuseDials atomic.Bool
}

func (f *faultyNet) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if f.refuseDials.Load() {
		return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &resetConn{Conn: conn, f: f}, nil
}

type resetConn struct {
	net.Conn
	f *faultyNet
}

func (c *resetConn) Write(p []byte) (int, error) {
	if c.f.failWrites.Load() {
		return 0, &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("write", syscall.ECONNRESET)}
	}
	return c.Conn.Write(p)
}

// TestStopSentOnlyWhenWritten checks TransportError.Sent against what the
// server saw: false whenever no request reached it, true when the server
// read the whole request and then went away without answering.
func TestStopSentOnlyWhenWritten(t *testing.T) {
	type wire int
	const (
		h1 wire = iota
		h1TLS
		h2TLS
	)
	tests := []struct {
		name    string
		wire    wire
		foreign bool // the client comes from WithHTTPClient, over connections this package did not dial
		warmUp  bool // one answered call first, so the call under test reuses a kept-alive connection
		// what goes wrong in the call under test
		failWrites, refuseDials, serverAborts bool
		wantSent                              bool
	}{
		{name: "fresh connection reset on write", wire: h1, failWrites: true},
		{name: "kept-alive connection reset on write, new dial refused", wire: h1, warmUp: true, failWrites: true, refuseDials: true},
		{name: "TLS: kept-alive connection reset on write, new dial refused", wire: h1TLS, warmUp: true, failWrites: true, refuseDials: true},
		{name: "HTTP/2: kept-alive connection reset on write, new dial refused", wire: h2TLS, warmUp: true, failWrites: true, refuseDials: true},
		{name: "server reads the request and closes", wire: h1, serverAborts: true, wantSent: true},
		{name: "kept-alive connection, server reads the request and closes", wire: h1, warmUp: true, serverAborts: true, wantSent: true},
		{name: "TLS: server reads the request and closes", wire: h1TLS, serverAborts: true, wantSent: true},
		{name: "HTTP/2: server reads the request and resets the stream", wire: h2TLS, serverAborts: true, wantSent: true},
		{name: "foreign client: kept-alive connection reset on write, new dial refused", wire: h1, foreign: true, warmUp: true, failWrites: true, refuseDials: true},
		{name: "foreign client: server reads the request and closes", wire: h1, foreign: true, serverAborts: true, wantSent: true},
		// The documented limit: without our own connections, a request lost
		// in net/http's final flush still reads as sent.
		{name: "foreign client: fresh connection reset on write", wire: h1, foreign: true, failWrites: true, wantSent: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var hits, proto atomic.Int32
			var abort atomic.Bool
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				proto.Store(int32(r.ProtoMajor))
				if abort.Load() {
					panic(http.ErrAbortHandler) // whole request read; close (HTTP/1.1) or reset the stream (HTTP/2)
				}
				w.WriteHeader(http.StatusNoContent)
			}))
			var f faultyNet
			cfg := Config{Timeout: 5 * time.Second, Credentials: staticCreds(keyCreds())}
			tr := newTransport(cfg, f.dial)
			if tc.foreign {
				tr = &http.Transport{DialContext: f.dial, ForceAttemptHTTP2: true}
			}
			wantProto := int32(1)
			if tc.wire == h1 {
				srv.Start()
			} else {
				srv.EnableHTTP2 = tc.wire == h2TLS
				srv.StartTLS()
				tr.TLSClientConfig = &tls.Config{RootCAs: srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
				if tc.wire == h2TLS {
					wantProto = 2
				}
			}
			t.Cleanup(srv.Close)
			cfg.Endpoint = srv.URL
			c := newTestClient(t, cfg, WithHTTPClient(&http.Client{Transport: tr}))

			if tc.warmUp {
				if _, err := c.Stop(context.Background(), testStop); err != nil {
					t.Fatalf("warm-up call: %v", err)
				}
				if p := proto.Load(); p != wantProto {
					t.Fatalf("warm-up spoke HTTP/%d, want HTTP/%d", p, wantProto)
				}
			}
			f.failWrites.Store(tc.failWrites)
			f.refuseDials.Store(tc.refuseDials)
			abort.Store(tc.serverAborts)
			before := hits.Load()

			resp, err := c.Stop(context.Background(), testStop)
			var te *TransportError
			if !errors.As(err, &te) || resp != nil {
				t.Fatalf("got (%v, %v), want *TransportError", resp, err)
			}
			if te.Sent != tc.wantSent || te.Timeout {
				t.Errorf("got Sent %v, Timeout %v (%v); want Sent %v, no Timeout", te.Sent, te.Timeout, err, tc.wantSent)
			}
			if v := Classify(resp, err); v.NotAnswered != tc.wantSent {
				t.Errorf("classified %+v", v)
			}
			wantHits := int32(0)
			if tc.serverAborts {
				wantHits = 1
				if p := proto.Load(); p != wantProto {
					t.Errorf("call spoke HTTP/%d, want HTTP/%d", p, wantProto)
				}
			}
			if got := hits.Load() - before; got != wantHits {
				t.Errorf("server saw %d requests from the call, want %d", got, wantHits)
			}
		})
	}
}

func TestCountingConnOf(t *testing.T) {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	cc := &countingConn{Conn: a}
	if countingConnOf(cc) != cc {
		t.Error("countingConn not found")
	}
	if countingConnOf(tls.Client(cc, &tls.Config{})) != cc {
		t.Error("countingConn under TLS not found")
	}
	if countingConnOf(a) != nil || countingConnOf(tls.Client(a, &tls.Config{})) != nil {
		t.Error("a foreign connection taken for ours")
	}
}
