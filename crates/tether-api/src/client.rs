pub struct TetherClient; #[derive(Debug)] pub struct ClientError;
