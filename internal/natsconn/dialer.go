package natsconn

import (
	"context"
	"net"
	"sync"
	"time"
)

// dialer lets the context given to Connect abort the first connect: dials
// use it, and connections dialled while Connect runs are closed when it is
// cancelled, which also aborts the TLS and protocol handshakes on them.
// After release, dials (reconnects) no longer depend on the context.
type dialer struct {
	ctx context.Context
	net net.Dialer

	mu       sync.Mutex
	released bool
	stops    []func() bool
}

func newDialer(ctx context.Context, timeout time.Duration) *dialer {
	return &dialer{ctx: ctx, net: net.Dialer{Timeout: timeout}}
}

// Dial implements nats.CustomDialer.
func (d *dialer) Dial(network, address string) (net.Conn, error) {
	d.mu.Lock()
	released := d.released
	d.mu.Unlock()
	if released {
		return d.net.Dial(network, address)
	}
	conn, err := d.net.DialContext(d.ctx, network, address)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(d.ctx, func() { conn.Close() })
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.released {
		stop()
	} else {
		d.stops = append(d.stops, stop)
	}
	return conn, nil
}

// release detaches the context from connections dialled so far and from
// later dials. It reports whether the context had already closed one of
// them.
func (d *dialer) release() (cancelled bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.released = true
	for _, stop := range d.stops {
		if !stop() {
			cancelled = true
		}
	}
	d.stops = nil
	return cancelled
}
