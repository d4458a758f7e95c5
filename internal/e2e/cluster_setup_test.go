package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf"
	"github.com/dlf-stop/worker/internal/embedded"
	"github.com/dlf-stop/worker/internal/testutil"
)

// faultCluster is a JetStream cluster of embedded servers on loopback.
// Each node keeps its options, so it restarts with the same name, ports
// and store directory, as a broker pod restarts on its volume.
// Only the test goroutine and its cleanup use it.
type faultCluster struct {
	t     *testing.T
	opts  []embedded.Options
	nodes []*server.Server
}

func startFaultCluster(t *testing.T, n int) *faultCluster {
	t.Helper()
	ports := faultFreePorts(t, 2*n) // routes name every node, so all are chosen first
	c := &faultCluster{t: t, opts: make([]embedded.Options, n), nodes: make([]*server.Server, n)}
	for i := range c.opts {
		var routes []string
		for j := 0; j < n; j++ {
			if j != i {
				routes = append(routes, "nats-route://127.0.0.1:"+strconv.Itoa(ports[n+j]))
			}
		}
		c.opts[i] = embedded.Options{Port: ports[i], StoreDir: t.TempDir(), ServerName: "n" + strconv.Itoa(i+1),
			ClusterName: "dlf-e2e", ClusterPort: ports[n+i], Routes: routes}
	}
	t.Cleanup(c.shutdown)
	for i := range c.opts {
		s, err := embedded.Start(c.opts[i])
		if err != nil {
			t.Fatalf("start %s: %v", c.opts[i].ServerName, err)
		}
		c.nodes[i] = s
	}
	return c
}

// faultFreePorts holds n listeners open at once, so the ports differ, and
// releases them for the servers.
func faultFreePorts(t *testing.T, n int) []int {
	t.Helper()
	ports := make([]int, n)
	ls := make([]net.Listener, n)
	for i := range ls {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls[i], ports[i] = l, l.Addr().(*net.TCPAddr).Port
	}
	for _, l := range ls {
		_ = l.Close()
	}
	return ports
}

// urls lists every node, node first first: a connection that does not
// randomize the list starts on that node and fails over in order.
func (c *faultCluster) urls(first int) string {
	u := make([]string, len(c.opts))
	for i := range c.opts {
		u[i] = "nats://127.0.0.1:" + strconv.Itoa(c.opts[(first+i)%len(c.opts)].Port)
	}
	return strings.Join(u, ",")
}

func (c *faultCluster) name(i int) string {
	if i < 0 || i >= len(c.opts) {
		return "none"
	}
	return c.opts[i].ServerName
}

func (c *faultCluster) shutdown() {
	for _, s := range c.nodes {
		if s != nil {
			s.Shutdown()
		}
	}
	for _, s := range c.nodes {
		if s != nil {
			s.WaitForShutdown()
		}
	}
}

// restart shuts node i down, waits until it is gone, and starts it again.
func (c *faultCluster) restart(i int) {
	c.t.Helper()
	c.nodes[i].Shutdown()
	c.nodes[i].WaitForShutdown()
	s, err := embedded.Start(c.opts[i])
	if err != nil {
		c.nodes[i] = nil
		c.t.Fatalf("restart %s: %v", c.opts[i].ServerName, err)
	}
	c.nodes[i] = s
}

// waitMetaLeader waits for exactly one meta leader with every node current.
func (c *faultCluster) waitMetaLeader(within time.Duration) {
	c.t.Helper()
	testutil.Eventually(c.t, within, func() error {
		leaders := 0
		for i := range c.opts {
			s := c.nodes[i]
			if s.JetStreamIsLeader() {
				leaders++
			}
			if !s.JetStreamIsCurrent() {
				return fmt.Errorf("%s: meta group not current", s.Name())
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d meta leaders", leaders)
		}
		return nil
	})
}

// waitCurrent waits until node i has rejoined: its meta group and every
// stream current.
func (c *faultCluster) waitCurrent(i int, streams []string, within time.Duration) {
	c.t.Helper()
	testutil.Eventually(c.t, within, func() error {
		s := c.nodes[i]
		if !s.JetStreamIsCurrent() {
			return fmt.Errorf("%s: meta group not current", s.Name())
		}
		for _, st := range streams {
			if !s.JetStreamIsStreamCurrent(faultAccount, st) {
				return fmt.Errorf("%s: stream %s not current", s.Name(), st)
			}
		}
		return nil
	})
}

// consumerLeader returns the index of the node leading the worker's
// consumer, or -1.
func (c *faultCluster) consumerLeader() int {
	for i := range c.opts {
		if c.nodes[i].JetStreamIsConsumerLeader(faultAccount, faultStopStream, faultConsumer) {
			return i
		}
	}
	return -1
}

func (c *faultCluster) streamLeader(stream string) int {
	for i := range c.opts {
		if c.nodes[i].JetStreamIsStreamLeader(faultAccount, stream) {
			return i
		}
	}
	return -1
}

// faultAsyncErrs counts asynchronous NATS errors (writes to a server that
// went away) instead of letting the default handler print them.
type faultAsyncErrs struct {
	n     atomic.Int64
	first atomic.Value
}

func (e *faultAsyncErrs) handle(_ *nats.Conn, _ *nats.Subscription, err error) {
	if e.n.Add(1) == 1 {
		e.first.Store(err.Error())
	}
}

// connectFault connects to the first of urls, failing over to the others
// in order and reconnecting forever; it is closed at cleanup.
func connectFault(t *testing.T, urls, name string, errs *faultAsyncErrs) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(urls, nats.Name(name), nats.DontRandomize(), nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond), nats.ReconnectJitter(10*time.Millisecond, 10*time.Millisecond),
		nats.ErrorHandler(errs.handle))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// startFaultWorker runs an in-process worker with its own connection, as a
// separate replica would. Cleanups run last-in first-out, so at teardown
// the worker's context is cancelled and Run has returned before its
// connection is closed, and both before the servers stop.
func startFaultWorker(t *testing.T, urls, emuURL string, creds dlf.Credentials, cfg consumer.Config, log *zap.Logger, errs *faultAsyncErrs) {
	t.Helper()
	nc := connectFault(t, urls, cfg.WorkerID, errs)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := consumer.Setup(ctx, js, cfg, log)
	if err != nil {
		t.Fatalf("%s: setup: %v", cfg.WorkerID, err)
	}
	client, err := dlf.NewClient(dlf.Config{Endpoint: emuURL, Timeout: cfg.CallTimeout, MaxConns: cfg.Concurrency,
		Credentials: func() dlf.Credentials { return creds }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	m, err := consumer.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	w, err := consumer.New(js, cons, client, cfg, log, m)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: Run: %v", cfg.WorkerID, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s: Run did not return within 30s of cancel", cfg.WorkerID)
		}
	})
}

// publishFaultCommands stores one command per id, with Nats-Msg-Id = id,
// and fails unless JetStream acknowledged every one.
func publishFaultCommands(t *testing.T, js jetstream.JetStream, ids []string, project, script string) {
	t.Helper()
	futures := make([]jetstream.PubAckFuture, 0, len(ids))
	for i, id := range ids {
		body := fmt.Sprintf(`{"command_id":%q,"project_id":%q,"script_name":%q,"instance_id":"inst-%05d","reason":"e2e broker faults"}`,
			id, project, script, i)
		for {
			f, err := js.PublishAsync("dlf.stop.request", []byte(body), jetstream.WithMsgID(id))
			if err == nil {
				futures = append(futures, f)
				break
			}
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				t.Fatalf("publish %s: %v", id, err)
			}
			<-js.PublishAsyncComplete()
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		t.Fatalf("commands not acknowledged within 60s (%d pending)", js.PublishAsyncPending())
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatalf("publish %s: %v", f.Msg().Header.Get(jetstream.MsgIDHeader), err)
		}
	}
}

// faultMoveLeader asks JetStream to step a stream or consumer leader down
// (retrying while the request cannot be served) and waits until another
// node leads. leader returns the leading node's index or -1.
func faultMoveLeader(t *testing.T, nc *nats.Conn, subject string, leader func() int) (was, now int) {
	t.Helper()
	was = leader()
	testutil.Eventually(t, 30*time.Second, func() error {
		resp, err := nc.Request(subject, nil, 5*time.Second)
		if err != nil {
			return fmt.Errorf("%s: %w", subject, err)
		}
		var r struct {
			Success bool `json:"success"`
			Error   *struct {
				Code        int    `json:"code"`
				Description string `json:"description"`
			} `json:"error"`
		}
		switch err := json.Unmarshal(resp.Data, &r); {
		case err != nil:
			return fmt.Errorf("%s: %w: %s", subject, err, resp.Data)
		case r.Error != nil:
			return fmt.Errorf("%s: %d %s", subject, r.Error.Code, r.Error.Description)
		case !r.Success:
			return fmt.Errorf("%s: not successful: %s", subject, resp.Data)
		}
		return nil
	})
	testutil.Eventually(t, 30*time.Second, func() error {
		if now = leader(); now < 0 || now == was {
			return fmt.Errorf("after %s the leader is node %d", subject, now)
		}
		return nil
	})
	return was, now
}
