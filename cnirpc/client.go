package cnirpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// ErrUnavailable is wrapped by client errors when overlayd cannot be
// reached: the socket is missing, refuses connections or times out.
var ErrUnavailable = errors.New("cnirpc: overlayd unavailable")

// maxResponseBytes bounds an answer read from overlayd.
const maxResponseBytes = 1 << 20

// Client talks to overlayd over its socket. It is safe for concurrent
// use. Each call is one HTTP/1.1 exchange on a connection of its own,
// written by hand: a CNI plugin makes one call per exec, and an
// http.Transport costs more to set up than the exchange itself.
type Client struct {
	socket string
}

// NewClient returns a client of the overlayd listening on socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket}
}

// Add asks for the address of r's container interface.
func (c *Client) Add(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, http.MethodPost, "add", r, &a)
	return a, err
}

// Check returns the attachment of r's container interface.
func (c *Client) Check(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, http.MethodPost, "check", r, &a)
	return a, err
}

// Del releases the address of r's container interface.
func (c *Client) Del(ctx context.Context, r Request) error {
	return c.do(ctx, http.MethodPost, "del", r, nil)
}

// GC releases the addresses of network on this host that no attachment
// in valid holds.
func (c *Client) GC(ctx context.Context, r GCRequest) (GCResponse, error) {
	var out GCResponse
	err := c.do(ctx, http.MethodPost, "gc", r, &out)
	return out, err
}

// Status returns the health of network on this host.
func (c *Client) Status(ctx context.Context, network string) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "status?network="+url.QueryEscape(network), nil, &st)
	return st, err
}

func (c *Client) do(ctx context.Context, method, op string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("encode %s request: %w", op, err)
		}
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return fmt.Errorf("overlayd at %s: %w: %w", c.socket, ErrUnavailable, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	var reqBuf bytes.Buffer
	fmt.Fprintf(&reqBuf, "%s /%s/%s HTTP/1.1\r\nHost: overlayd\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
		method, Version, op, len(body))
	reqBuf.Write(body)
	if _, err := conn.Write(reqBuf.Bytes()); err != nil {
		return fmt.Errorf("send %s to overlayd at %s: %w: %w", op, c.socket, ErrUnavailable, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return fmt.Errorf("read %s answer: %w: %w", op, ErrUnavailable, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return fmt.Errorf("read %s answer: %w: %w", op, ErrUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK {
		e := &Error{}
		if json.Unmarshal(data, e) != nil || e.Code == 0 {
			return &Error{Code: CodeInternal, Msg: fmt.Sprintf("overlayd answered %s to %s", resp.Status, op), Details: string(bytes.TrimSpace(data))}
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return &Error{Code: CodeDecodingFailure, Msg: "decode overlayd's " + op + " answer", Details: err.Error()}
	}
	return nil
}
